"""Training the user branch: Diffusion-DPO (or any loss of ``LOSSES``) on per-user pairs, the reference model
being the same denoiser with the branch switched off; only the projection and the user key/value train.

One process. With a checkpoint folder it saves the branch, the optimizer and the generator every
``psa.checkpoint_every`` steps (``safealign.training.checkpoints``, as the LoRA loop does) and an interrupted run
resumes from the newest checkpoint of the same key, ending with the same branch as an uninterrupted one.
The step is the project's ``preference_step``; the supervised term (``psa.sft_weight``) is the ``sft`` term.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.core.io import write_csv_row
from safealign.core.runtime import poll_threads
from safealign.psa.branch import UserBranch, UserFamily, token_edits
from safealign.training.checkpoints import load_checkpoint, save_checkpoint, summarize_log, truncate_log
from safealign.training.data import PairData, concat_pairs
from safealign.training.losses import LossFn
from safealign.training.step import StepDraws, preference_step
from safealign.training.terms import TERMS, ActiveTerm

LOG_COLUMNS = ("step", "loss", "accuracy", "margin", "err_w", "err_l", "sft", "teacher", "words")
TEXT = "encoder_hidden_states"  # the condition key whose states reach every cross-attention layer


@dataclass(frozen=True)
class WordData:
    """The word term's rows (``pairs.word_plan``) as indices into the render pairs' text states: row r is user
    ``user[r]`` under pair ``pair[r]``'s safe (``safe_caption``) or unsafe caption, with the target the safe twin's
    states (``safe_target``) or the caption's own. ``unsafe``/``safe``: (P, L, D) states; ``vectors``: (U, D)."""
    unsafe: torch.Tensor
    safe: torch.Tensor
    pair: torch.Tensor
    safe_caption: torch.Tensor
    safe_target: torch.Tensor
    user: torch.Tensor
    vectors: torch.Tensor

    def __len__(self) -> int:
        return len(self.pair)

    def select(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(caption states, target states, user vectors, the pair's unsafe states, its safe states) of ``rows``."""
        i = self.pair[rows]
        pick = lambda which: torch.where(which[rows].view(-1, 1, 1), self.safe[i], self.unsafe[i])
        return (pick(self.safe_caption), pick(self.safe_target), self.vectors[self.user[rows]].float(),
                self.unsafe[i], self.safe[i])


def word_data(plan: list[tuple[int, int, str, str]], cache: dict[str, torch.Tensor],
              vectors: torch.Tensor) -> WordData:
    """``pairs.word_plan``'s rows over the render cache's text states (``cond.`` / ``cond_safe.`` + TEXT)."""
    if "cond." + TEXT not in cache:
        raise ValueError(f"psa.word_weight: the render cache has no cond.{TEXT} (the cross-attention's text states)")
    col = lambda k: torch.tensor([p[k] for p in plan])
    safe_caption = torch.tensor([p[2] == "safe" for p in plan])
    # the target is the safe twin's states where the plan says so, and the caption's own ("same") otherwise
    safe_target = torch.tensor([p[3] == "safe" for p in plan]) | safe_caption
    return WordData(cache["cond." + TEXT], cache["cond_safe." + TEXT], col(1), safe_caption, safe_target, col(0),
                    vectors)


def word_term(branch: UserBranch, states: torch.Tensor, target: torch.Tensor, user: torch.Tensor,
              unsafe: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """How far each cross-attention layer's word edit (``psa.query: tokens``) is from the target text, row by row
    relative to the gap between the row's twins: per layer and projection P (to_k, to_v),
    ``|P(e') - P(target)|^2 / |P(unsafe) - P(safe)|^2`` (sums over the row's tokens), averaged over rows, layers
    and projections. What UCE minimises for one edit of the weights, here per user; 1 = an error as large as the
    twins' difference (an untrained branch on a row whose target is the twin), 0 = the target reached. Each
    pair weighs the same, whether its twins differ in one colour word or in a background that changes every
    later token's state."""
    total, n = torch.zeros(states.shape[0], device=states.device), 0
    for attn, edited in token_edits(branch, states, user):
        for proj in (attn.to_k, attn.to_v):
            with torch.no_grad():
                want = proj(target).float()
                gap = (proj(unsafe).float() - proj(safe).float()).pow(2).flatten(1).sum(1).clamp_min(1e-12)
            total = total + (proj(edited).float() - want).pow(2).flatten(1).sum(1) / gap
            n += 1
    return total.mean() / n


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
                 twins: tuple[torch.Tensor, PairData] | None = None,
                 words: WordData | None = None) -> dict[str, float]:
    """Train ``branch`` (attached to ``fam``'s denoiser) on ``data`` (its cond carries ``xattn.user``) with the
    settings of ``cfg`` (params.psa). ``checkpoints``: the folder to checkpoint into and resume from (``key``
    identifies the run); None: neither. ``teacher`` (``psa.teacher``, ``teacher.py``) and ``sets`` (each pair's
    banned-set index): the teacher term, weight ``cfg.teacher_weight``, on both images of ``cfg.batch_size`` pairs
    of one banned set per step (the set drawn as a pair is, so sets weigh as their pairs do).
    ``twins`` (``psa.contrast``; ``pairs.twin_plan``): the rows of ``data`` that have a counterfactual twin and
    the twins' data, aligned; a share ``cfg.contrast`` of each batch is then couples (a row and its twin) that
    share one timestep and noise, so what the two users' opposite preferences have in common cancels.
    ``words`` (``psa.word_weight``, query tokens): the word term, weight ``cfg.word_weight``, on ``cfg.word_batch``
    rows a step: each layer's edit of a caption for a user matched to the text it should become.
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
        loss, distill, wording = out.loss, torch.zeros(()), torch.zeros(())
        if teacher is not None:  # pairs of one banned set (drawn as a pair is): one teacher adapter per step
            pool = (sets == sets[torch.randint(0, len(data), (1,), generator=gen)]).nonzero().flatten()
            taught = data.select(pool[torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)])
            both = torch.cat([taught.x0_w, taught.x0_l]).to(fam.device)
            distill = teacher_term(view, teacher, both, {k: torch.cat([v, v]).to(fam.device)
                                                         for k, v in taught.cond.items()},
                                   torch.full((both.shape[0],), int(sets[pool[0]])), gen)
            loss = loss + cfg.teacher_weight * distill
        if words is not None:
            picked = words.select(torch.randint(0, len(words), (cfg.word_batch,), generator=gen))
            wording = word_term(branch, *(x.to(fam.device) for x in picked))
            loss = loss + cfg.word_weight * wording
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "loss": loss.item(), "accuracy": out.accuracy, "margin": out.margin,
               "err_w": out.err_w, "err_l": out.err_l, "sft": out.terms.get("sft", 0.0),
               "teacher": distill.item(), "words": wording.item()}
        write_csv_row(log_csv, row, LOG_COLUMNS)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
        if checkpoints is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(checkpoints, step + 1, branch.state_dict(), opt, gen, key, log_csv=log_csv)
    branch.requires_grad_(False)
    return summarize_log(log_csv)
