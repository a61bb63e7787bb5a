"""Image-quality metrics (distribution quality and prompt fidelity beyond the detectors).

Metrics are named in ``safealign.evaluation.QUALITY``; an entry is a factory ``(params) -> QualityMetric``;
calling the metric with the generated images (uint8 (N, H, W, 3)), their prompts, and reference images (uint8,
or None) returns a float. A metric whose weights are absent raises ``safealign.core.errors.MissingWeights`` and
is reported as missing with the reason.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class QualityMetric(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> float: ...

    def protocol(self) -> dict[str, Any]: ...


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the formula of FID.

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}); the square-root trace is computed from the
    eigenvalues of S_a^{1/2} S_b S_a^{1/2}, which are real and non-negative.
    """
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    s_a, s_b = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    mid = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(mid, 0, None)).sum())
