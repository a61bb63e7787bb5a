"""The Diffusion-DPO training loop for one LoRA expert, with checkpoints it resumes from.

Runs through ``accelerate``: one CPU process here, many GPUs unchanged (each process takes its share of every
batch; gradients are averaged by the wrapper). Checkpoints hold the LoRA weights, the optimizer state and the
data/noise generator's state, all in safetensors (nothing is unpickled), so a resumed run continues exactly
where the interrupted one stopped and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stages.dpo import dpo_step
from stages.family import Cond, Family, cond_index
from stages.io import write_csv_row
from stages.losses import LOSSES

LOG_COLUMNS = ("step", "loss", "accuracy", "margin", "err_w", "err_l", "anchor", "lr")


@dataclasses.dataclass
class PairData:
    """Cached training pairs: model-space images (x0_w preferred, x0_l rejected) and one condition per pair."""

    x0_w: torch.Tensor
    x0_l: torch.Tensor
    cond: Cond

    def __len__(self) -> int:
        return self.x0_w.shape[0]

    def select(self, idx: torch.Tensor) -> PairData:
        return PairData(self.x0_w[idx], self.x0_l[idx], cond_index(self.cond, idx))


@dataclasses.dataclass
class AnchorData:
    """Cached anchor rows for the anchor term: model-space images and their prompts' conditions."""

    x0: torch.Tensor
    cond: Cond

    def __len__(self) -> int:
        return self.x0.shape[0]

    def select(self, idx: torch.Tensor) -> AnchorData:
        return AnchorData(self.x0[idx], cond_index(self.cond, idx))


def config_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, step: int, fam: Family, opt: torch.optim.Optimizer, gen: torch.Generator,
                    key: str, keep: int = 2, log_csv: Path | None = None) -> None:
    """Write ``folder/step_XXXXXX`` in one rename, then drop all but the ``keep`` newest. The per-step log so far
    goes with it: DVC deletes a stage's outputs (the log) before a re-run, while checkpoints survive."""
    final = folder / f"step_{step:06d}"
    tmp = folder / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(fam.lora_state_dict(), str(tmp / "lora.safetensors"))
    if log_csv is not None and log_csv.exists():
        shutil.copy2(log_csv, tmp / "log.csv")
    tensors: dict[str, torch.Tensor] = {"generator": gen.get_state()}
    scalars: dict[str, Any] = {}
    for i, (pid, st) in enumerate(opt.state_dict()["state"].items()):
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{name}"] = val.contiguous()
            else:
                scalars[f"opt.{pid}.{name}"] = val
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "key": key, "scalars": scalars}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, key: str, fam: Family, opt: torch.optim.Optimizer,
                    gen: torch.Generator, log_csv: Path | None = None) -> int:
    """Restore the newest checkpoint written for this exact configuration, and the log it carries to
    ``log_csv``; returns its step (0 if none)."""
    for ckpt in sorted(folder.glob("step_*"), reverse=True):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            lora = load_file(str(ckpt / "lora.safetensors"))
            state = load_file(str(ckpt / "state.safetensors"))
        except (OSError, ValueError, json.JSONDecodeError):
            continue  # an unreadable checkpoint is skipped, an older one may still serve
        if meta.get("key") != key:
            continue
        from peft.utils import set_peft_model_state_dict

        prefix = len("unet.")
        set_peft_model_state_dict(fam.raw_unet, {k[prefix:]: v for k, v in lora.items()})
        opt_sd = opt.state_dict()
        for pid in list(opt_sd["state"]) or range(len(opt_sd["param_groups"][0]["params"])):
            entry = {name.split(".", 2)[2]: val for name, val in state.items() if name.startswith(f"opt.{pid}.")}
            entry.update({name.split(".", 2)[2]: val for name, val in meta["scalars"].items()
                          if name.startswith(f"opt.{pid}.")})
            if entry:
                opt_sd["state"][pid] = entry
        opt.load_state_dict(opt_sd)
        gen.set_state(state["generator"])
        if log_csv is not None and (ckpt / "log.csv").exists():
            log_csv.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt / "log.csv", log_csv)
        return int(meta["step"])
    return 0


# ---------------------------------------------------------------------------------------------- the loop
def train_expert(fam: Family, data: PairData, cfg: Any, seed: int, key: str, checkpoints: Path,
                 log_csv: Path, desc: str = "train", anchors: AnchorData | None = None) -> dict[str, float]:
    """Train a fresh LoRA on ``data`` with the loss and hyper-parameters of ``cfg`` (params.train).

    ``anchors`` feed the anchor term when ``cfg.anchor_weight`` > 0 (then they are required).

    ``key`` identifies the run (params, data, base model): a checkpoint is resumed only when its key matches.
    Returns the mean of the last 20 logged steps, read back from the log (a resumed run reports the same).
    """
    use_anchor = cfg.anchor_weight > 0
    if use_anchor and (anchors is None or len(anchors) == 0):
        raise ValueError("train.anchor_weight > 0 needs anchor rows (the safe sides of the training pairs)")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=fam.device.type == "cpu")
    torch.manual_seed(seed)  # the LoRA's gaussian init
    fam.add_lora(cfg.rank, cfg.alpha, cfg.targets)
    params = fam.lora_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    start = load_checkpoint(checkpoints, key, fam, opt, gen, log_csv)
    for _ in range(start):
        sched.step()
    _truncate_log(log_csv, start)
    fam.unet, opt = accelerator.prepare(fam.unet, opt)
    loss_fn = LOSSES.get(cfg.loss)
    empty = fam.empty_cond(1)
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps,
               disable=not accelerator.is_local_main_process)
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch = data.select(idx[rank::world])
        cond = {k: torch.where(drop[rank::world].view(-1, *[1] * (v.dim() - 1)), empty[k].to(v), v).to(fam.device)
                for k, v in batch.cond.items()}
        anchor = None
        if use_anchor:
            a = anchors.select(torch.randint(0, len(anchors), (cfg.anchor_batch_size,), generator=gen)[rank::world])
            anchor = (a.x0.to(fam.device), {k: v.to(fam.device) for k, v in a.cond.items()})
        with accelerator.autocast():
            out = dpo_step(fam, batch.x0_w.to(fam.device), batch.x0_l.to(fam.device), cond, loss_fn, cfg.beta, gen,
                           anchor, cfg.anchor_weight, cfg.sft_weight)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        row = {"step": step + 1, "loss": out.loss.item(), "accuracy": out.accuracy, "margin": out.margin,
               "err_w": out.err_w, "err_l": out.err_l, "anchor": out.anchor, "lr": sched.get_last_lr()[0]}
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.2f}")
        if accelerator.is_main_process:
            write_csv_row(log_csv, row, LOG_COLUMNS)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(checkpoints, step + 1, fam, opt, gen, key, log_csv=log_csv)
        accelerator.wait_for_everyone()
    fam.unet = accelerator.unwrap_model(fam.unet)
    return summarize_log(log_csv)


def summarize_log(path: Path, last: int = 20) -> dict[str, float]:
    """Mean loss, accuracy and margin of the last ``last`` steps in the CSV log."""
    lines = path.read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, x.split(",")))) for x in lines[1:][-last:] if x]
    return {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in ("loss", "accuracy", "margin")}


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    lines = path.read_text().splitlines()
    kept = [lines[0]] + [x for x in lines[1:] if x and int(x.split(",", 1)[0]) <= step]
    path.write_text("\n".join(kept) + "\n")
