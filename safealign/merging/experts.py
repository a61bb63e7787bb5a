"""Merging a set of expert LoRA files into one LoRA: what the `merge` stage does, as a library function, so a
method that trains its own experts (``sc_dpo.mode: experts``) merges them by the same rules and code.

``merge_experts`` reads the experts, computes Co-Merge's input statistics when the rule needs them, merges layer
by layer (``safealign.merging.deltas``) and re-factors to a rank-``merge.rank`` LoRA; ``save_merged`` writes the
LoRA and the full delta.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from safealign.core.io import atomic_path
from safealign.families.lora import read_lora, save_lora
from safealign.merging.calibration import input_stats
from safealign.merging.deltas import merge_state_dicts
from safealign.merging.rules import MergeOptions
from safealign.training.data import Cached


@dataclasses.dataclass
class Merged:
    lora: dict[str, torch.Tensor]     # the merged LoRA, rank merge.rank
    deltas: dict[str, torch.Tensor]   # the merged full delta per layer
    errors: dict[str, float]          # relative error of the SVD re-factoring per layer
    targets: list[str]
    experts: list[str]

    def summary(self, method: str, rank: int) -> dict[str, Any]:
        err = np.array(list(self.errors.values()))
        norms = [float(v.norm()) for v in self.deltas.values()]
        return {"method": method, "experts": self.experts, "svd_rank": rank,
                "svd_rel_error": {"mean": float(err.mean()), "max": float(err.max())},
                "delta_norm": float(np.sqrt(sum(n * n for n in norms)))}


def merge_experts(files: Sequence[Path], names: Sequence[str], params: Any, fam: Any = None,
                  cached: Cached | None = None) -> Merged:
    """Merge the expert LoRA ``files`` (of categories ``names``, in that order) with ``merge.method``.

    ``fam``: the loaded base family, needed by Co-Merge's calibration (its experts are attached one at a time);
    ``cached``: the render cache, read once. ``single`` (one expert) gives the expert back, re-factored."""
    loaded = [read_lora(Path(f)) for f in files]
    stats = None
    if params.merge.method == "co_merge":
        if fam is None:
            raise ValueError("co_merge needs the base family for its calibration statistics")
        stats = [input_stats(fam, Path(f), c, params, cached) for f, c in zip(files, names, strict=True)]
    return merge_loaded(loaded, names, params, stats)


def merge_loaded(loaded: Sequence[tuple[dict[str, torch.Tensor], dict[str, str]]], names: Sequence[str],
                 params: Any, stats: Sequence[Any] | None = None) -> Merged:
    """``merge_experts`` on experts already read (``read_lora``'s pairs) and, for Co-Merge, their input
    statistics already computed: for a caller that merges many subsets of the same experts."""
    m = params.merge
    if m.method == "co_merge" and stats is None:
        raise ValueError("co_merge needs the experts' input statistics")
    rank, alpha = int(loaded[0][1]["rank"]), float(loaded[0][1]["alpha"])
    rule = "linear" if m.method == "single" else m.method  # one expert: every rule gives it back
    merged, deltas, errors = merge_state_dicts(
        [s for s, _ in loaded], alpha, rank, rule, MergeOptions(density=m.density, scale=m.scale, seed=params.seed,
                                                           balance=m.balance),
        stats, m.rank)
    return Merged(merged, deltas, errors, loaded[0][1]["targets"].split(","), list(names))


def save_merged(folder: Path, merged: Merged, params: Any, delta: bool = True) -> None:
    """``folder/lora.safetensors`` (rank merge.rank) and, if ``delta``, ``folder/delta.safetensors``."""
    m = params.merge
    save_lora(Path(folder) / "lora.safetensors", merged.lora, m.rank, float(m.rank), merged.targets,
              method=m.method, experts=",".join(merged.experts))
    if delta:
        with atomic_path(Path(folder) / "delta.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in merged.deltas.items()}, str(tmp), metadata={"method": m.method})
