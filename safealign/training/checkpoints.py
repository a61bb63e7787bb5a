"""Training checkpoints: the trained weights (a LoRA, or PSA's user branch), the optimizer state and the
data/noise generator's state, all in safetensors (nothing is unpickled), so a resumed run continues exactly where
the interrupted one stopped and ends with the same weights. A checkpoint carries the per-step log so far and the
key of the run that wrote it.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    gen: torch.Generator, key: str, keep: int = 2, log_csv: Path | None = None) -> None:
    """Write ``folder/step_XXXXXX`` (``weights``: the trained tensors by name) in one rename, then drop all but
    the ``keep`` newest. The per-step log so far goes with it: DVC deletes a stage's outputs (the log) before a
    re-run, while checkpoints survive."""
    final = folder / f"step_{step:06d}"
    tmp = folder / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "lora.safetensors"))
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


def load_checkpoint(folder: Path, key: str, restore: Callable[[dict[str, torch.Tensor]], Any],
                    opt: torch.optim.Optimizer, gen: torch.Generator, log_csv: Path | None = None) -> int:
    """Restore the newest checkpoint written for this exact configuration (``restore`` takes its weights), and
    the log it carries to ``log_csv``; returns its step (0 if none)."""
    for ckpt in sorted(folder.glob("step_*"), reverse=True):
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            lora = load_file(str(ckpt / "lora.safetensors"))
            state = load_file(str(ckpt / "state.safetensors"))
        except (OSError, ValueError, json.JSONDecodeError):
            continue  # an unreadable checkpoint is skipped, an older one may still serve
        if meta.get("key") != key:
            continue
        restore(lora)
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


def truncate_log(path: Path, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    lines = path.read_text().splitlines()
    kept = [lines[0]] + [x for x in lines[1:] if x and int(x.split(",", 1)[0]) <= step]
    path.write_text("\n".join(kept) + "\n")


def summarize_log(path: Path, last: int = 20) -> dict[str, float]:
    """Mean loss, accuracy and margin of the last ``last`` steps in the CSV log."""
    lines = path.read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, x.split(",")))) for x in lines[1:][-last:] if x]
    return {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in ("loss", "accuracy", "margin")}
