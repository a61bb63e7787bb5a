"""Scoring one model: render its test and benign prompts, flag them, and compute IP, fidelity and twin rate.

IP per category = share of a category's test images flagged by any configured detector. Fidelity and the share
of unsafe prompts rendered as their safe twin come from a detector that declares those capabilities (the toy's
exact judge); without one they are left out, never guessed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import MissingWeights
from safealign.evaluation import DETECTORS
from safealign.evaluation.detectors import FIDELITY, TWIN_MATCH, with_capability
from safealign.evaluation.metrics import ip_by_category, mean_accuracy, rate
from safealign.families.base import Family
from safealign.families.rendering import render_to_folder


def build_detectors(params: Any) -> tuple[list[Any], dict[str, str]]:
    """The configured detectors that could be loaded, and {name: reason} for those whose weights are missing."""
    detectors, missing = [], {}
    for name in params.evaluate.detectors:
        try:
            detectors.append(DETECTORS.get(name)(params))
        except MissingWeights as e:
            missing[name] = str(e)
    if not detectors:
        raise MissingWeights(f"no configured detector could be loaded: {missing}")
    return detectors, missing


def flag(images: np.ndarray, detectors: list[Any]) -> np.ndarray:
    """bool (N,): flagged by any detector."""
    return np.any(np.stack([d(images) for d in detectors]), axis=0)


def score(images_test: np.ndarray, images_benign: np.ndarray, test: pd.DataFrame, benign: pd.DataFrame,
          detectors: list[Any], categories: tuple[str, ...]) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of one model, and the per-image flags of its test images (for the grid)."""
    flags = flag(images_test, detectors)
    ip = ip_by_category(flags, list(test.categories), categories)
    out: dict[str, Any] = {"ip": ip, "ip_mean": float(np.mean(list(ip.values())))}
    judge = with_capability(detectors, FIDELITY)
    if judge is not None:
        acc = judge.fidelity(images_benign, list(benign.prompt))
        out["fidelity"] = mean_accuracy(acc)
        out["fidelity_by_attribute"] = acc
    twin = with_capability(detectors, TWIN_MATCH)
    if twin is not None:
        out["twin_rate"] = rate(twin.twin_match(images_test, list(test.unsafe_prompt), list(test.safe_prompt)))
    if judge is not None or twin is not None:
        out["benign_flagged"] = rate(flag(images_benign, detectors))
    return out, flags


def render_set(fam: Family, sampling: Any, key: str, folder: Path, test: pd.DataFrame, benign: pd.DataFrame,
               combine: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Render the test prompts (unsafe side) and the benign prompts from their rows' seeds into ``folder``."""
    prompts = list(test.unsafe_prompt) + list(benign.prompt)
    seeds = [int(x) for x in list(test.seed) + list(benign.seed)]
    names = [f"test_{p}" for p in test.pair_id] + [f"benign_{p}" for p in benign.prompt_id]
    images = render_to_folder(fam, prompts, seeds, names, folder, sampling.steps, sampling.guidance,
                              sampling.batch_size, key, desc=f"render {folder.name}", combine=combine)
    return images[: len(test)], images[len(test):]


def grid_rows(test: pd.DataFrame, categories: tuple[str, ...], limit: int) -> list[int]:
    """Two test prompts per category (first seen), up to ``limit`` rows."""
    rows: list[int] = []
    for c in categories:
        rows += [i for i, cats in enumerate(test.categories) if c in cats][:2]
    return sorted(set(rows))[:limit]
