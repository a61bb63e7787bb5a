"""The All-single expert (`train_all`) is trained only when something reads it.

``models/experts/all.safetensors`` feeds ``merge.method: single`` (the paper's All-single baseline) and
``attack.target: expert:all``. Under any other setting the stage writes an *untrained marker* in its place: a
safetensors file with no tensors whose metadata says why, an empty training log and a metrics file with
``trained: false``. Reading the marker as a LoRA fails with that reason (``safealign.families.lora.read_lora``).
This module imports no torch, so a skipped stage costs only its start-up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safealign.core.io import atomic_path, safetensors_bytes, write_json

MARKER_KEY = "not_trained"


def all_single_unused(params: Any) -> str | None:
    """Why the All-single expert is not needed under ``params``, or None when something reads it."""
    if params.merge.method == "single":
        return None
    if params.attack.target == "expert:all":
        return None
    return (f"merge.method is {params.merge.method!r} and attack.target is {params.attack.target!r}; "
            "set merge.method: single (or attack.target: expert:all) to train it")


def write_unused_expert(path: Path, metrics_dir: Path, category: str, reason: str) -> None:
    """Write the untrained marker, an empty log (header only) and ``{"trained": false, "reason": ...}``."""
    with atomic_path(Path(path)) as tmp:  # atomic_path makes the folders
        tmp.write_bytes(safetensors_bytes({}, {"category": category, MARKER_KEY: reason}))  # no tensors: no torch
    metrics_dir = Path(metrics_dir)
    with atomic_path(metrics_dir / f"{category}.csv") as tmp:
        tmp.write_text("step,loss\n")
    write_json(metrics_dir / f"{category}.json", {"trained": False, "reason": reason})
