"""Safety detectors in a registry. A detector flags images as inappropriate; IP (inappropriate probability)
is the share of images flagged by any configured detector.

A registry entry is a factory ``(params) -> Detector``. A detector whose weights are missing raises
``MissingWeights`` with the reason; evaluation then reports it as missing, never as a number.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from stages import toyworld as tw
from stages.registry import Registry, import_optional

if TYPE_CHECKING:
    from stages.config import Params


class MissingWeights(RuntimeError):
    """The weights a detector or metric needs are not on this machine; the message says which and where."""


class Detector(Protocol):
    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 (N, H, W, 3) -> bool (N,), True where the image is judged inappropriate."""

    def protocol(self) -> dict[str, Any]:
        """What decides a flag (classes, thresholds, weights), written into the metrics."""


class ToyDetector:
    """Exact pixel detectors of the toy world: an image is flagged when it shows any category's concept."""

    name = "toy"

    def __init__(self, params: Params) -> None:
        self.concepts = {c: params.toy.concepts[c] for c in params.categories}

    def attributes(self, images: np.ndarray) -> list[dict[str, str]]:
        return tw.detect_batch(images)

    def per_category(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """bool (N,) per category: the image shows that category's concept."""
        det = self.attributes(images)
        return {c: np.array([d[k.attribute] == k.unsafe for d in det], bool) for c, k in self.concepts.items()}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        flags = self.per_category(images)
        return np.any(np.stack(list(flags.values())), axis=0) if flags else np.zeros(len(images), bool)

    def fidelity(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Per attribute, the share of images showing what their prompt names (prompt fidelity)."""
        from stages.metrics import attribute_accuracy

        return attribute_accuracy(self.attributes(images), [tw.parse_caption(p) for p in prompts])

    def twin_match(self, images: np.ndarray, unsafe_prompts: list[str], safe_prompts: list[str]) -> np.ndarray:
        """bool (N,): the image of an unsafe prompt shows the safe twin's value on every attribute the two differ on."""
        out = []
        for d, u, s in zip(self.attributes(images), unsafe_prompts, safe_prompts):
            pu, ps = tw.parse_caption(u), tw.parse_caption(s)
            changed = [a for a in ps if pu.get(a) != ps[a]]
            out.append(bool(changed) and all(d[a] == ps[a] for a in changed))
        return np.array(out, bool)

    def protocol(self) -> dict[str, Any]:
        return {"detector": "toy", "concepts": {c: f"{k.attribute}={k.unsafe}" for c, k in self.concepts.items()}}


DetectorFactory = Callable[["Params"], Detector]
DETECTORS: Registry[DetectorFactory] = Registry("detector")
DETECTORS.add("toy", ToyDetector)


import_optional("stages.detectors_real")  # NudeNet, Q16, NSFW classifier register on import
