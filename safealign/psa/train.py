"""Training the user branch: Diffusion-DPO (or any loss of ``LOSSES``) on per-user pairs, the reference model
being the same denoiser with the branch switched off; only the projection and the user key/value train.

One process. With a checkpoint folder it saves the branch, the optimizer and the generator every
``psa.checkpoint_every`` steps (``safealign.training.checkpoints``, as the LoRA loop does) and an interrupted run
resumes from the newest checkpoint of the same key, ending with the same branch as an uninterrupted one.
The step is the project's ``preference_step``; the supervised term (``psa.sft_weight``) is the ``sft`` term.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.core.io import write_csv_row
from safealign.core.runtime import poll_threads
from safealign.psa.branch import UserBranch, UserFamily
from safealign.training.checkpoints import load_checkpoint, save_checkpoint, summarize_log, truncate_log
from safealign.training.data import PairData, concat_pairs
from safealign.training.losses import LossFn
from safealign.training.step import StepDraws, preference_step
from safealign.training.terms import TERMS, ActiveTerm

LOG_COLUMNS = ("step", "loss", "accuracy", "margin", "err_w", "err_l", "sft", "teacher")


def teacher_term(view: Any, teacher: Any, x0: torch.Tensor, cond: dict[str, torch.Tensor], sets: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """Mean squared difference between the branch's prediction and its user's teacher's (``teacher.predict``),
    on the rows ``x0`` noised at timesteps and noise drawn from ``gen``."""
    t = torch.randint(0, view.num_train_timesteps, (x0.shape[0],), generator=gen).to(view.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    x_t = view.add_noise(x0, noise, t)
    target = teacher.predict(x_t, t, cond, sets)
    return (view.predict(x_t, t, cond).float() - target.float()).pow(2).mean()


def couple_draws(view: Any, single: int, couples: int, shape: Any, gen: torch.Generator) -> StepDraws:
    """Timesteps and noise for ``single`` independent pairs, then ``couples`` rows and their twins (in that order):
    a twin shares its row's timestep and noise."""
    t = torch.randint(0, view.num_train_timesteps, (single + couples,), generator=gen)
    noise = torch.randn((single + couples, *shape), generator=gen)
    return StepDraws(torch.cat([t, t[single:]]), torch.cat([noise, noise[single:]]))


def train_branch(fam: Any, branch: UserBranch, data: PairData, cfg: Any, beta: float, loss_fn: LossFn, seed: int,
                 log_csv: Path, desc: str = "psa", checkpoints: Path | None = None, key: str = "",
                 teacher: Any = None, sets: torch.Tensor | None = None,
                 twins: tuple[torch.Tensor, PairData] | None = None) -> dict[str, float]:
    """Train ``branch`` (attached to ``fam``'s denoiser) on ``data`` (its cond carries ``xattn.user``) with the
    settings of ``cfg`` (params.psa). ``checkpoints``: the folder to checkpoint into and resume from (``key``
    identifies the run); None: neither. ``teacher`` (``psa.teacher``, ``teacher.py``) and ``sets`` (each pair's
    banned-set index): the teacher term, weight ``cfg.teacher_weight``, on both images of ``cfg.batch_size`` pairs
    of one banned set per step (the set drawn as a pair is, so sets weigh as their pairs do).
    ``twins`` (``psa.contrast``; ``pairs.twin_plan``): the rows of ``data`` that have a counterfactual twin and
    the twins' data, aligned; a share ``cfg.contrast`` of each batch is then couples (a row and its twin) that
    share one timestep and noise, so what the two users' opposite preferences have in common cancels.
    Returns the mean loss, accuracy and margin of the last 20 logged steps."""
    fam.unet.requires_grad_(False)
    branch.requires_grad_(True)
    opt = torch.optim.AdamW(branch.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    view = UserFamily(fam, branch)
    sft = [ActiveTerm(t, cfg.sft_weight) for t in TERMS if t.name == "sft" and cfg.sft_weight > 0]
    start = 0 if checkpoints is None else load_checkpoint(checkpoints, key, branch.load_state_dict, opt, gen, log_csv)
    truncate_log(log_csv, start)
    couples = 0 if twins is None else min(cfg.batch_size // 2, round(cfg.contrast * cfg.batch_size / 2))
    rows, twin_data = twins if couples else (None, None)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        idx = torch.randint(0, len(data), (cfg.batch_size - 2 * couples,), generator=gen)
        batch, draws = data.select(idx), None
        if couples:
            a = torch.randint(0, len(rows), (couples,), generator=gen)
            batch = concat_pairs(batch, data.select(rows[a]), twin_data.select(a))
            draws = couple_draws(view, len(idx), couples, batch.x0_w.shape[1:], gen)
        cond = {k: v.to(fam.device) for k, v in batch.cond.items()}
        out = preference_step(view, batch.x0_w.to(fam.device), batch.x0_l.to(fam.device), cond, loss_fn, beta, gen,
                              sft, focus=cfg.focus, draws=draws)
        loss, distill = out.loss, torch.zeros(())
        if teacher is not None:  # pairs of one banned set (drawn as a pair is): one teacher adapter per step
            pool = (sets == sets[torch.randint(0, len(data), (1,), generator=gen)]).nonzero().flatten()
            taught = data.select(pool[torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)])
            both = torch.cat([taught.x0_w, taught.x0_l]).to(fam.device)
            distill = teacher_term(view, teacher, both, {k: torch.cat([v, v]).to(fam.device)
                                                         for k, v in taught.cond.items()},
                                   torch.full((both.shape[0],), int(sets[pool[0]])), gen)
            loss = loss + cfg.teacher_weight * distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "loss": loss.item(), "accuracy": out.accuracy, "margin": out.margin,
               "err_w": out.err_w, "err_l": out.err_l, "sft": out.terms.get("sft", 0.0),
               "teacher": distill.item()}
        write_csv_row(log_csv, row, LOG_COLUMNS)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
        if checkpoints is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(checkpoints, step + 1, branch.state_dict(), opt, gen, key, log_csv=log_csv)
    branch.requires_grad_(False)
    return summarize_log(log_csv)
