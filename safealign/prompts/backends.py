"""``PROMPT_BACKENDS``: the one place the prompt backends' names live (``prompts.backend`` in params).

Entries are lazy (``"module:function"``), so validating params imports no LLM stack. A backend is a callable
``(params) -> safealign.prompts.schema.PromptSets``.
"""
from __future__ import annotations

from typing import Any

from safealign.core.registry import Registry

PROMPT_BACKENDS: Registry[Any] = Registry("prompt backend")
PROMPT_BACKENDS.add_lazy("grammar", "safealign.toyworld.grammar:grammar_backend")  # the toy world's captions
PROMPT_BACKENDS.add_lazy("local", "safealign.prompts.recipe:local_backend")  # the CoProV2 recipe, per LLM backend
PROMPT_BACKENDS.add_lazy("openai", "safealign.prompts.recipe:openai_backend")
PROMPT_BACKENDS.add_lazy("vllm", "safealign.prompts.recipe:vllm_backend")
PROMPT_BACKENDS.add_lazy("file", "safealign.prompts.file:file_backend")  # a published pair file (CoProV2 layout)
