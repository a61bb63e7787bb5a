"""Training: cached pair data, preference losses, weighted extra terms, the step, the loop, checkpoints.

``LOSSES`` is the one place the preference losses' names live (``train.loss``). Entries are lazy
(``"module:function"``); a loss is ``loss(batch: PreferenceBatch, beta) -> LossOutput``
(``safealign.training.losses``).
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

LOSSES: Registry[Any] = Registry("loss")
LOSSES.add_lazy("dpo", "safealign.training.losses:diffusion_dpo")
LOSSES.add_lazy("sc_dpo", "safealign.sc_dpo.loss:sc_dpo_loss")  # SC-DPO: cost margin + DFM (safealign/sc_dpo/loss.py)
