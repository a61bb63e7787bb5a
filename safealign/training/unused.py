"""The All-single expert (`train_all`) is trained only when something reads it.

``models/experts/all.safetensors`` feeds ``merge.method: single`` (the paper's All-single baseline) and
``attack.target: expert:all``. Under any other setting the stage writes an *untrained marker* in its place: a
safetensors file with no tensors whose metadata says why, an empty training log and a metrics file with
``trained: false``. Reading the marker as a LoRA fails with that reason (``safealign.families.lora.read_lora``).
This module imports no torch, so a skipped stage costs only its start-up.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from safealign.core.io import atomic_path, write_json

MARKER_KEY = "not_trained"


def all_single_unused(params: Any) -> str | None:
    """Why the All-single expert is not needed under ``params``, or None when something reads it."""
    if params.merge.method == "single":
        return None
    if params.attack.target == "expert:all":
        return None
    return (f"merge.method is {params.merge.method!r} and attack.target is {params.attack.target!r}; "
            "set merge.method: single (or attack.target: expert:all) to train it")


def marker_bytes(reason: str, category: str) -> bytes:
    """A valid safetensors file with no tensors and metadata {category, not_trained: reason} (sorted keys)."""
    header = json.dumps({"__metadata__": {"category": category, MARKER_KEY: reason}}, sort_keys=True,
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(header)) + header


def write_unused_expert(path: Path, metrics_dir: Path, category: str, reason: str) -> None:
    """Write the untrained marker, an empty log (header only) and ``{"trained": false, "reason": ...}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(marker_bytes(reason, category))
    metrics_dir = Path(metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(metrics_dir / f"{category}.csv") as tmp:
        tmp.write_text("step,loss\n")
    write_json(metrics_dir / f"{category}.json", {"trained": False, "reason": reason})
