"""safealign: safety alignment of text-to-image diffusion models, as a library under a DVC pipeline.

Layers, each importing only the ones above it in this list (docs/architecture.md):

- ``core``: registries, params, atomic I/O, hashing, errors, runtime (no torch at import).
- ``families``: the model-family interface, LoRA I/O, resumable rendering, the SD and toy families.
- ``toyworld``: the embedded toy world (vocabulary, drawing, exact detectors, grammar prompts, pretraining).
- ``prompts``: prompt-pair schema, prompt backends (LLM recipe), importers of published prompt sets.
- ``training``: cached pair data, preference losses, weighted extra terms, the step, the loop, checkpoints.
- ``merging``: merge rules, LoRA <-> full deltas, Co-Merge calibration statistics.
- ``evaluation``: detectors, quality metrics, metrics, grids, plots, scoring.
- one subpackage per alignment method (``safetydpo``), registered in ``safealign.methods``.

The DVC stage commands live apart, in the top-level ``stages`` package.
"""

from safealign.core.runtime import prefer_short_spin as _prefer_short_spin

_prefer_short_spin()  # before torch loads OpenMP: the threading policy, safealign/core/runtime.py
