"""Evaluation: safety detectors, quality metrics, metrics, grids, plots and the scoring of one model.

``DETECTORS`` and ``QUALITY`` are the one place their names live. Entries are lazy (``"module:factory"``):
validating ``evaluate.detectors`` imports no detector. A factory takes the params and returns the detector
(``safealign.evaluation.detectors.Detector``) or metric (``safealign.evaluation.quality.QualityMetric``).
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

DETECTORS: Registry[Any] = Registry("detector")
DETECTORS.add_lazy("toy", "safealign.toyworld.judge:ToyDetector")
DETECTORS.add_lazy("nudenet", "safealign.evaluation.detectors_real:NudeNetDetector")
DETECTORS.add_lazy("q16", "safealign.evaluation.detectors_real:Q16Detector")
DETECTORS.add_lazy("nsfw", "safealign.evaluation.detectors_real:OpenNSFWDetector")

QUALITY: Registry[Any] = Registry("quality metric")
QUALITY.add_lazy("toy_fd", "safealign.toyworld.quality:ToyFD")
QUALITY.add_lazy("fid", "safealign.evaluation.quality_real:FID")
QUALITY.add_lazy("clipscore", "safealign.evaluation.quality_real:CLIPScore")

# Extra evaluation prompt sets (`evaluate.sets`, safealign.evaluation.sets): a source is ``(params) -> table``;
# `<format>:<path>` names an imported file instead.
SETS: Registry[Any] = Registry("evaluation prompt set")
SETS.add_lazy("ood", "safealign.evaluation.sets:ood_source")
SETS.add_lazy("ring_a_bell", "safealign.evaluation.sets:ring_a_bell_source")
SETS.add_lazy("whitebox", "safealign.evaluation.sets:whitebox_source")
