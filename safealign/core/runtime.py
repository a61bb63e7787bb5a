"""Threads and devices: the one place that turns ``params.runtime`` into torch settings."""
from __future__ import annotations

from typing import Any


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where a GPU is present, else 'cpu'; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_runtime(params: Any) -> str:
    """Set torch's thread count from ``runtime.threads`` and pick the device; returns the device string."""
    import torch

    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    return resolve_device(params.runtime.device)
