"""Adversarial attacks on a text-to-image model: prompt sets that try to bring back an erased concept.

``ATTACKS`` (``attack.methods``) is the one place their names live; entries are lazy. An attack is a function
``(ctx: AttackContext) -> (table, report)`` (``safealign.attacks.run``): the prompt set it writes to
``data/attacks/<name>.parquet`` (scored by `evaluate` through ``evaluate.sets``) and what goes into
``metrics/attacks.json`` (budget, run time, per-category results).

- ``ring_a_bell`` (Tsai et al. 2024): model-agnostic, only the text encoder (``safealign.attacks.ring_a_bell``).
- ``whitebox`` (UnlearnDiff / P4D style): optimises prompt token embeddings through the target's denoiser
  (``safealign.attacks.whitebox``).

``CONCEPT_WORDS`` (by family) names the words of a category's concept, which an attack must not use.
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

ATTACKS: Registry[Any] = Registry("attack")
ATTACKS.add_lazy("ring_a_bell", "safealign.attacks.ring_a_bell:attack")
ATTACKS.add_lazy("whitebox", "safealign.attacks.whitebox:attack")

CONCEPT_WORDS: Registry[Any] = Registry("concept-word source")  # family -> (params, category) -> words
CONCEPT_WORDS.add_lazy("toy", "safealign.toyworld.ood:concept_words")
