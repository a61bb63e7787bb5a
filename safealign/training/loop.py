"""The preference-training loop for one LoRA (an expert), with checkpoints it resumes from.

Runs through ``accelerate``: one CPU process here, many GPUs unchanged (each process takes its share of every
batch; gradients are averaged by the wrapper). See ``safealign.training.checkpoints`` for what a resumed run
restores: it ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from safealign.core.errors import UserError
from safealign.core.io import write_csv_row
from safealign.core.runtime import poll_threads
from safealign.families.base import Family
from safealign.families.lora import set_module_state
from safealign.training import LOSSES
from safealign.training.checkpoints import load_checkpoint, save_checkpoint, summarize_log, truncate_log
from safealign.training.data import AnchorData, PairData
from safealign.training.losses import LossFn
from safealign.training.step import global_draws, preference_step
from safealign.training.terms import LOG_TERMS, ActiveTerm, active_terms

LOG_COLUMNS = ("step", "loss", "accuracy", "margin", "err_w", "err_l", *LOG_TERMS, "lr")


def train_expert(fam: Family, data: PairData, cfg: Any, seed: int, key: str, checkpoints: Path,
                 log_csv: Path, desc: str = "train", rows: Mapping[str, AnchorData] | None = None,
                 loss_fn: LossFn | None = None) -> dict[str, float]:
    """Train a fresh LoRA on ``data`` with the loss, terms and hyper-parameters of ``cfg`` (params.train).

    ``rows``: the row data of the active terms that bring rows, by ``Term.rows_from`` (e.g. ``{"anchors": ...}``
    when ``cfg.anchor_weight`` > 0; then they are required). ``loss_fn``: a configured loss (e.g. with its
    options bound by ``functools.partial``) instead of ``LOSSES[cfg.loss]``; per-pair costs in ``data`` reach it.

    ``key`` identifies the run (params, data, base model): a checkpoint is resumed only when its key matches.
    Returns the mean of the last 20 logged steps, read back from the log (a resumed run reports the same).
    """
    terms = active_terms(cfg)
    rows = dict(rows or {})
    for term in terms:
        if term.rows_from and len(rows.get(term.rows_from, ())) == 0:
            raise ValueError(f"train.{term.param} > 0 needs {term.rows_from} rows "
                             "(the safe sides of the training pairs)")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=fam.device.type == "cpu")
    world = accelerator.num_processes
    for name in ["batch_size", *(term.batch_param for term in terms if term.batch_param)]:
        n = getattr(cfg, name)
        if n % world:  # equal shares, so that averaging the processes' gradients gives the whole batch's
            raise UserError(f"train.{name}={n}: not a multiple of the {world} training processes")
    torch.manual_seed(seed)  # the LoRA's gaussian init
    fam.add_lora(cfg.rank, cfg.alpha, cfg.targets)
    params = fam.lora_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    start = load_checkpoint(checkpoints, key, lambda sd: set_module_state(fam.raw_unet, sd), opt, gen, log_csv)
    with warnings.catch_warnings():  # the schedule fast-forwards to the resumed step before any optimizer step, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        for _ in range(start):
            sched.step()
    truncate_log(log_csv, start)
    fam.unet, opt = accelerator.prepare(fam.unet, opt)
    loss_fn = loss_fn or LOSSES.get(cfg.loss)
    empty = fam.empty_cond(1)
    rank = accelerator.process_index
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps,
               disable=not accelerator.is_local_main_process)
    for step in bar:
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch = data.select(idx[rank::world])
        cond = {k: torch.where(drop[rank::world].view(-1, *[1] * (v.dim() - 1)), empty[k].to(v), v).to(fam.device)
                for k, v in batch.cond.items()}
        weighted, row_shapes = [], []
        for term in terms:
            picked = None
            if term.rows_from:
                src = rows[term.rows_from]
                n = getattr(cfg, term.batch_param)
                r = src.select(torch.randint(0, len(src), (n,), generator=gen)[rank::world])
                picked = (r.x0.to(fam.device), {k: v.to(fam.device) for k, v in r.cond.items()})
                if term.forward:  # rows that ride in the denoiser's pass get timesteps and noise
                    row_shapes.append((term.name, n, tuple(src.x0.shape[1:])))
            weighted.append(ActiveTerm(term, getattr(cfg, term.param), picked))
        # several processes: draw the whole batch's timesteps and noise (as one process would) and take this
        # process's share, so that N processes train the same LoRA as one with the same global batch
        draws = (global_draws(fam, cfg.batch_size, tuple(data.x0_w.shape[1:]), row_shapes, gen,
                              slice(rank, None, world)) if world > 1 else None)
        with accelerator.autocast():
            costs = {k: None if v is None else v.to(fam.device) for k, v in
                     (("cost_w", batch.cost_w), ("cost_l", batch.cost_l))}
            out = preference_step(fam, batch.x0_w.to(fam.device), batch.x0_l.to(fam.device), cond, loss_fn, cfg.beta,
                                  gen, weighted, draws=draws, focus=cfg.focus, **costs)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        logged = {"loss": out.loss.item(), "accuracy": out.accuracy, "margin": out.margin, "err_w": out.err_w,
                  "err_l": out.err_l}
        if world > 1:  # the log shows the whole batch: the mean over processes (equal shares)
            means = accelerator.reduce(torch.tensor(list(logged.values()), device=fam.device), "mean")
            logged = dict(zip(logged, means.tolist()))
        row = {"step": step + 1, **logged, **{c: 0.0 for c in LOG_TERMS}, "lr": sched.get_last_lr()[0]}
        row.update({t.log_column: out.terms[t.name] for t in terms if t.log_column})
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.2f}")
        if accelerator.is_main_process:
            write_csv_row(log_csv, row, LOG_COLUMNS)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(checkpoints, step + 1, fam.lora_state_dict(), opt, gen, key, log_csv=log_csv)
        accelerator.wait_for_everyone()
    fam.unet = accelerator.unwrap_model(fam.unet)
    return summarize_log(log_csv)

