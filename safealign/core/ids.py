"""Row ids and per-row seeds of prompt tables: the one scheme every prompt backend uses.

Pair i gets ``pair_id = "p{i:05d}"`` and seed ``seed * 1_000_003 + i``; benign prompt i gets ``"b{i:05d}"`` and
seed ``seed * 1_000_003 + 500_000 + i``, so seeds never collide between the two tables of one run.
"""
from __future__ import annotations

import numpy as np

SEED_STRIDE = 1_000_003
BENIGN_OFFSET = 500_000


def pair_ids(n: int) -> list[str]:
    return [f"p{i:05d}" for i in range(n)]


def benign_ids(n: int) -> list[str]:
    return [f"b{i:05d}" for i in range(n)]


def pair_seeds(seed: int, n: int) -> np.ndarray:
    return seed * SEED_STRIDE + np.arange(n, dtype=np.int64)


def benign_seeds(seed: int, n: int) -> np.ndarray:
    return seed * SEED_STRIDE + BENIGN_OFFSET + np.arange(n, dtype=np.int64)


CLEAN_OFFSET = 700_000  # SC-DPO's clean prompts (safealign.sc_dpo.clean): two seeds each, after the benign range


def clean_ids(n: int) -> list[str]:
    return [f"c{i:05d}" for i in range(n)]


def clean_seeds(seed: int, n: int) -> np.ndarray:
    """(n, 2): the two seeds of clean prompt i, ``seed * 1_000_003 + 700_000 + 2i`` and ``... + 2i + 1``."""
    return seed * SEED_STRIDE + CLEAN_OFFSET + np.arange(2 * n, dtype=np.int64).reshape(n, 2)


def expert_seed(seed: int, category: str, categories: tuple[str, ...]) -> int:
    """The training seed of an expert: distinct per category, 0 offset for `all` (stages/train.py, sc_dpo experts)."""
    return seed * 1000 + (categories.index(category) + 1 if category != "all" else 0)
