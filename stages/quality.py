"""Image-quality metrics in a registry (distribution quality and prompt fidelity beyond the detectors).

A registry entry is a factory ``(params) -> QualityMetric``; calling the metric with the generated images
(uint8 (N, H, W, 3)), their prompts, and reference images (uint8, or None) returns a float. A metric whose
weights are absent raises ``stages.detectors.MissingWeights`` and is reported as missing with the reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from stages.registry import Registry, import_optional

if TYPE_CHECKING:
    from stages.config import Params


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


def toy_features(images: np.ndarray) -> np.ndarray:
    """Fixed features of toy images: an 8x8 average-pooled thumbnail plus per-channel means and stds: (N, 198)."""
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    thumb = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    return np.concatenate([thumb, x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def drawn_reference(prompts: Sequence[str], size: int, seed: int) -> np.ndarray:
    """The toy world's 'real images' for prompts: each drawn with what it names, the rest at random."""
    from stages import toyworld as tw

    rng = np.random.default_rng(seed)
    scenes = [tw.random_scene(rng, **tw.parse_caption(p)) for p in prompts]
    return (tw.draw_batch(scenes, size, rng) * 255).round().astype(np.uint8)


class ToyFD:
    """The toy analogue of FID: Fréchet distance of ``toy_features`` between generated images and a reference
    (by default the same prompts drawn by the toy world's renderer)."""

    name = "toy_fd"

    def __init__(self, params: Params) -> None:
        self.seed = params.seed

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> float:
        if reference is None:
            reference = drawn_reference(prompts, images.shape[1], self.seed)
        return frechet_distance(toy_features(images), toy_features(reference))

    def protocol(self) -> dict[str, Any]:
        return {"metric": "toy_fd", "features": "8x8 thumbnail + channel mean/std", "reference": "drawn images"}


QUALITY: Registry[Callable[["Params"], QualityMetric]] = Registry("quality metric")
QUALITY.add("toy_fd", ToyFD)


import_optional("stages.quality_real")  # FID, CLIPScore register on import
