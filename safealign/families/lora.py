"""LoRA weights on disk and in peft: the one definition of the key convention and of LoRA I/O.

Keys follow diffusers' convention for a UNet LoRA, which ``load_lora_weights`` reads:
``unet.<module>.lora_A.weight`` (r, in) and ``unet.<module>.lora_B.weight`` (out, r). Files are safetensors
with the config (rank, alpha, targets) as metadata; nothing pickle-based is ever read.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LORA_PREFIX = "unet."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
FORMAT = "safetydpo-lora-v1"


def to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys (``unet.<module>...``) -> peft's keys (``<module>...``)."""
    return {k[len(LORA_PREFIX):]: v for k, v in state.items()}


def from_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's keys -> file keys, as contiguous float32 CPU tensors."""
    return {LORA_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights attached to ``module`` (a UNet), with file keys."""
    from peft.utils import get_peft_model_state_dict

    return from_peft(get_peft_model_state_dict(module))


def set_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> Any:
    """Load LoRA weights with file keys into the adapter ``adapter_name`` of ``module``; returns peft's result."""
    from peft.utils import set_peft_model_state_dict

    return set_peft_model_state_dict(module, to_peft(state), adapter_name=adapter_name)


def save_lora(path: Path, state: dict[str, torch.Tensor], rank: int, alpha: float, targets: Sequence[str],
              **meta: str) -> None:
    """Write a LoRA state dict (file keys) with its config as metadata, atomically and byte-reproducibly."""
    from safealign.core.io import atomic_path, safetensors_bytes

    md = {"rank": str(rank), "alpha": str(alpha), "targets": ",".join(targets), "format": FORMAT}
    md.update({k: str(v) for k, v in meta.items()})
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(safetensors_bytes({k: v.contiguous() for k, v in state.items()}, md))


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA written by ``save_lora``; refuses anything that is not safetensors and checks its shape."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA weights load from .safetensors only (pickle-based files are refused)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if "not_trained" in meta:  # safealign.training.unused: a stage that had no reader for it
        raise ValueError(f"{path}: this expert was not trained ({meta['not_trained']})")
    for key in ("rank", "alpha", "targets"):
        if key not in meta:
            raise ValueError(f"{path}: LoRA metadata lacks {key!r}")
    sd = load_file(str(path))
    rank = int(meta["rank"])
    bad = [k for k, v in sd.items() if ("lora_A" in k and v.shape[0] != rank) or ("lora_B" in k and v.shape[1] != rank)]
    if bad:
        raise ValueError(f"{path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, not rank {rank} as its metadata says")
    a_keys = {k.replace("lora_A", "") for k in sd if "lora_A" in k}
    b_keys = {k.replace("lora_B", "") for k in sd if "lora_B" in k}
    if a_keys != b_keys or not a_keys:
        raise ValueError(f"{path}: LoRA keys are incomplete (every lora_A needs its lora_B)")
    return sd, meta
