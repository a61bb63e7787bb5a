"""The toy analogue of FID (``evaluate.quality: [toy_fd]``): Fréchet distance of fixed pixel features between
generated images and drawn ones."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from safealign.evaluation.quality import frechet_distance
from safealign.toyworld import world as tw


def toy_features(images: np.ndarray) -> np.ndarray:
    """Fixed features of toy images: an 8x8 average-pooled thumbnail plus per-channel means and stds: (N, 198)."""
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    thumb = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    return np.concatenate([thumb, x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def drawn_reference(prompts: Sequence[str], size: int, seed: int) -> np.ndarray:
    """The toy world's 'real images' for prompts: each drawn with what it names, the rest at random."""
    rng = np.random.default_rng(seed)
    scenes = [tw.random_scene(rng, **tw.parse_caption(p)) for p in prompts]
    return (tw.draw_batch(scenes, size, rng) * 255).round().astype(np.uint8)


class ToyFD:
    """The toy analogue of FID: Fréchet distance of ``toy_features`` between generated images and a reference
    (by default the same prompts drawn by the toy world's renderer)."""

    name = "toy_fd"

    def __init__(self, params: Any) -> None:
        self.seed = params.seed

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> float:
        if reference is None:
            reference = drawn_reference(prompts, images.shape[1], self.seed)
        return frechet_distance(toy_features(images), toy_features(reference))

    def protocol(self) -> dict[str, Any]:
        return {"metric": "toy_fd", "features": "8x8 thumbnail + channel mean/std", "reference": "drawn images"}
