"""Merging: merge rules (pure functions), LoRA <-> full deltas, and Co-Merge's calibration statistics.

``MERGE_RULES`` is the one place the rules' names live (``merge.method``; ``single``, the unmerged All-single
expert, is handled by the merge stage). Entries are lazy (``"module:function"``); a rule is
``rule(deltas, *, options, stats) -> merged delta`` (``safealign.merging.rules``).
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

MERGE_RULES: Registry[Any] = Registry("merge rule")
MERGE_RULES.add_lazy("linear", "safealign.merging.rules:linear")
MERGE_RULES.add_lazy("task_arithmetic", "safealign.merging.rules:task_arithmetic")
MERGE_RULES.add_lazy("ties", "safealign.merging.rules:ties")
MERGE_RULES.add_lazy("dare", "safealign.merging.rules:dare")
MERGE_RULES.add_lazy("max_abs", "safealign.merging.rules:max_abs")
MERGE_RULES.add_lazy("co_merge", "safealign.merging.rules:co_merge")
