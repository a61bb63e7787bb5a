"""SC-DPO (Ruan et al., arXiv 2504.14290): a learned safety cost inside the preference objective, plus dynamic
focusing of hard pairs. Our reading of a paper whose formulas are not public (``../shared/METHOD.md``); every
concrete form here is a documented design choice.

- ``loss.py``: the SC-DPO loss (pure), registered as ``train.loss: sc_dpo`` in ``safealign.training.LOSSES``;
- ``cost.py``: the cost model's losses and metrics (pure: contrastive Bradley-Terry, category-aware contrast,
  anchoring, AUROC, calibration error);
- ``encoders.py``: the frozen image encoders (``ENCODERS``, ``sc_dpo.encoder``) and the trainable head;
- ``costmodel.py``: fitting the head on the render stage's pairs, scoring images, saving and loading;
- ``clean.py``: clean-prompt preference pairs (two seeds of a benign prompt, the better image preferred) and
  their mixing share (``CLEAN_SOURCES``, ``PREFERENCE``);
- ``method.py``: the ``sc_dpo`` method (``METHODS``): one LoRA on all categories' pairs with the SC-DPO loss.

The `cost` stage (``stages/cost.py``) writes ``COST`` (the head) and ``metrics/cost.json``; the `clean` stage
(``stages/clean.py``) writes ``CLEAN`` and ``metrics/clean.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safealign.core.registry import Registry

COST = Path("models/cost")  # the cost stage's output folder (dvc.yaml names the same path)
CLEAN = Path("data/clean")  # the clean stage's output folder: clean-prompt pairs (``clean.py``)

ENCODERS: Registry[Any] = Registry("cost encoder")  # sc_dpo.encoder; factories in safealign.sc_dpo.encoders
ENCODERS.add_lazy("random_conv", "safealign.sc_dpo.encoders:RandomConvEncoder")
ENCODERS.add_lazy("clip", "safealign.sc_dpo.encoders:ClipEncoder")

CLEAN_SOURCES: Registry[Any] = Registry("clean prompt source")  # sc_dpo.clean_source: (params) -> list[str]
CLEAN_SOURCES.add_lazy("grammar", "safealign.toyworld.grammar:clean_prompts")
CLEAN_SOURCES.add_lazy("file", "safealign.sc_dpo.clean:file_prompts")

MANIFEST_COLUMNS = ("pair_id", "prompt", "seed_w", "seed_l", "score_w", "score_l", "image_w", "image_l")  # clean's
UNUSED_KEY = "not_built"  # metadata key of the clean stage's cache when no method reads the clean pairs


def clean_unused(params: Any) -> str | None:
    """Why the clean-prompt pairs are not needed under ``params``, or None when something reads them: only
    ``method: sc_dpo`` with ``sc_dpo.clean_share`` > 0 mixes them into training. The `clean` stage then writes
    an empty set whose cache names the reason, instead of rendering (as `train_all` writes its marker). The
    reason is the same for every other setting, so switching between them leaves that set (and what follows)
    unchanged."""
    if params.method == "sc_dpo" and params.sc_dpo.clean_share > 0:
        return None
    return "not read: only method sc_dpo with sc_dpo.clean_share > 0 reads the clean pairs"


PREFERENCE: Registry[Any] = Registry("clean-pair preference")  # sc_dpo.clean_preference: (params) -> scorer
PREFERENCE.add_lazy("prompt_match", "safealign.sc_dpo.clean:PromptMatch")
