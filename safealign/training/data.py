"""The training data: the render stage's cache of pairs (model-space images of both sides and the condition of
each pair's prompts), read once per stage, and the row sets the loop samples from.

The cache (``data/render/cache.safetensors``) holds ``x0_w`` (safe image), ``x0_l`` (unsafe image), ``cond.*`` (the
unsafe prompt's condition) and ``cond_safe.*`` (the safe prompt's, for the anchor term), in the order of
``manifest.parquet``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch

from safealign.core.io import read_table
from safealign.core.paths import RENDER
from safealign.families.base import Cond, cond_index

Cached = tuple[Any, dict[str, torch.Tensor]]  # (manifest DataFrame, cache tensors)


@dataclasses.dataclass
class PairData:
    """Cached training pairs: model-space images (x0_w preferred, x0_l rejected), one condition per pair, and
    optionally each side's safety cost (N,) (a cost model's scores), which the step forwards to the loss."""

    x0_w: torch.Tensor
    x0_l: torch.Tensor
    cond: Cond
    cost_w: torch.Tensor | None = None
    cost_l: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x0_w.shape[0]

    def select(self, idx: torch.Tensor) -> PairData:
        pick = lambda c: None if c is None else c[idx]
        return PairData(self.x0_w[idx], self.x0_l[idx], cond_index(self.cond, idx), pick(self.cost_w),
                        pick(self.cost_l))


def concat_pairs(*parts: PairData) -> PairData:
    """The rows of each part in order (conditions with the same keys; costs kept only if every part carries them)."""
    for p in parts[1:]:
        if set(p.cond) != set(parts[0].cond):
            raise ValueError(f"pair conditions differ: {sorted(parts[0].cond)} vs {sorted(p.cond)}")
    cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)
    return PairData(torch.cat([p.x0_w for p in parts]), torch.cat([p.x0_l for p in parts]),
                    {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond}, cat([p.cost_w for p in parts]),
                    cat([p.cost_l for p in parts]))


@dataclasses.dataclass
class AnchorData:
    """Cached anchor rows for the anchor term: model-space images and their prompts' conditions."""

    x0: torch.Tensor
    cond: Cond

    def __len__(self) -> int:
        return self.x0.shape[0]

    def select(self, idx: torch.Tensor) -> AnchorData:
        return AnchorData(self.x0[idx], cond_index(self.cond, idx))


def read_cache() -> Cached:
    """The render manifest and cache, checked to list the same pairs in the same order (read once per stage)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    manifest = read_table(RENDER / "manifest.parquet", ["pair_id", "categories"])
    cache = load_file(str(RENDER / "cache.safetensors"))
    with safe_open(str(RENDER / "cache.safetensors"), framework="pt") as f:
        order = json.loads(f.metadata()["pair_ids"])
    if order != list(manifest.pair_id):
        raise ValueError(f"{RENDER}/cache.safetensors: rows do not match manifest.parquet; re-run `dvc repro render`")
    return manifest, cache


def load_anchors(cached: Cached | None = None) -> AnchorData:
    """The safe side of every training pair (image and safe-prompt condition): the anchor term's rows.
    ``cached``: what ``read_cache()`` returned, if the caller has it already."""
    _, cache = cached or read_cache()
    cond = {k.removeprefix("cond_safe."): v for k, v in cache.items() if k.startswith("cond_safe.")}
    if not cond:
        raise ValueError(f"{RENDER}/cache.safetensors: no safe-prompt conditions (cond_safe.*), which "
                         "train.anchor_weight > 0 needs; re-run `dvc repro render`")
    return AnchorData(cache["x0_w"], cond)


def pair_rows(category: str, categories: Sequence[str], manifest: Any) -> list[int]:
    """The manifest rows of ``category``'s pairs ('all': of every category in ``categories``), in order."""
    wanted = set(categories) if category == "all" else {category}
    return [i for i, cats in enumerate(manifest.categories) if wanted & set(cats)]


def load_pairs(category: str, categories: Sequence[str], cached: Cached | None = None) -> PairData:
    """The cached pairs of ``category`` ('all': of every category in params); ``cached`` as in load_anchors."""
    manifest, cache = cached or read_cache()
    rows = pair_rows(category, categories, manifest)
    if not rows:
        raise ValueError(f"category {category!r} has no training pairs in {RENDER}/manifest.parquet")
    idx = torch.tensor(rows)
    cond = {k.removeprefix("cond."): v for k, v in cache.items() if k.startswith("cond.")}
    return PairData(cache["x0_w"][idx], cache["x0_l"][idx], cond_index(cond, idx))


ROW_SOURCES = {"anchors": load_anchors}  # the row data a term can ask for (Term.rows_from), by name
