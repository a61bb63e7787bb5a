"""The detector interface. A detector flags images as inappropriate; IP (inappropriate probability) is the share
of images flagged by any configured detector. Detectors are named in ``safealign.evaluation.DETECTORS``.

A detector declares what it can measure in ``capabilities``; evaluation asks for a capability, never for a
concrete detector:
- ``flags``: ``__call__(images) -> bool (N,)`` (every detector);
- ``fidelity``: ``fidelity(images, prompts) -> {attribute: accuracy}``, how often an image shows what its prompt names;
- ``prompt_match``: ``prompt_match(images, prompts) -> float (N,)``, per image the share of what its prompt names
  that it shows (ranks two images of one prompt: SC-DPO's clean-prompt pairs);
- ``twin_match``: ``twin_match(images, unsafe_prompts, safe_prompts) -> bool (N,)``, the image of an unsafe prompt
  shows its safe twin instead.
A detector whose weights are missing raises ``safealign.core.errors.MissingWeights`` with the reason; evaluation
then reports it as missing, never as a number.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

FLAGS, FIDELITY, TWIN_MATCH = "flags", "fidelity", "twin_match"
PROMPT_MATCH = "prompt_match"


class Detector(Protocol):
    name: str
    capabilities: frozenset[str]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 (N, H, W, 3) -> bool (N,), True where the image is judged inappropriate."""

    def protocol(self) -> dict[str, Any]:
        """What decides a flag (classes, thresholds, weights), written into the metrics."""


def with_capability(detectors: list[Any], capability: str) -> Any | None:
    """The first detector that declares ``capability``, or None."""
    return next((d for d in detectors if capability in getattr(d, "capabilities", ())), None)
