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
