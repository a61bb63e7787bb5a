"""Training the user branch: Diffusion-DPO (or any loss of ``LOSSES``) on per-user pairs, the reference model
being the same denoiser with the branch switched off; only the projection and the user key/value train.

One process, no checkpoints (a toy run is minutes; a real-model run would want the LoRA loop's resume, not done).
The step is the project's ``preference_step``; the supervised term (``psa.sft_weight``) is the ``sft`` term.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.core.io import write_csv_row
from safealign.psa.branch import UserBranch, UserFamily
from safealign.training.data import PairData
from safealign.training.losses import LossFn
from safealign.training.step import preference_step
from safealign.training.terms import TERMS, ActiveTerm

LOG_COLUMNS = ("step", "loss", "accuracy", "margin", "err_w", "err_l", "sft")


def train_branch(fam: Any, branch: UserBranch, data: PairData, cfg: Any, beta: float, loss_fn: LossFn, seed: int,
                 log_csv: Path, desc: str = "psa") -> dict[str, float]:
    """Train ``branch`` (attached to ``fam``'s denoiser) on ``data`` (its cond carries ``xattn.user``) with the
    settings of ``cfg`` (params.psa). Returns the mean loss, accuracy and margin of the last 20 steps."""
    fam.unet.requires_grad_(False)
    branch.requires_grad_(True)
    opt = torch.optim.AdamW(branch.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    view = UserFamily(fam, branch)
    sft = [ActiveTerm(t, cfg.sft_weight) for t in TERMS if t.name == "sft" and cfg.sft_weight > 0]
    if log_csv.exists():
        log_csv.unlink()
    rows: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc=desc)
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        batch = data.select(idx)
        cond = {k: v.to(fam.device) for k, v in batch.cond.items()}
        out = preference_step(view, batch.x0_w.to(fam.device), batch.x0_l.to(fam.device), cond, loss_fn, beta, gen,
                              sft)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(branch.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "loss": out.loss.item(), "accuracy": out.accuracy, "margin": out.margin,
               "err_w": out.err_w, "err_l": out.err_l, "sft": out.terms.get("sft", 0.0)}
        rows.append(row)
        write_csv_row(log_csv, row, LOG_COLUMNS)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
    branch.requires_grad_(False)
    last = rows[-20:]
    return {k: sum(r[k] for r in last) / len(last) for k in ("loss", "accuracy", "margin")}
