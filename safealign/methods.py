"""``METHODS``: what builds the aligned model that ``evaluate`` scores (``method`` in params.yaml).

The one place the methods' names live. Entries are lazy (``"module:Class"``). A method is a class with:

- ``build(params, out: Path, device) -> dict``: the `align` stage; from what earlier stages wrote (for SafetyDPO:
  the merged LoRA), write the aligned model's artifacts into ``out`` (``models/aligned/``) and return metrics;
- ``attach(fam, folder: Path, params) -> files``: make a loaded base family render as the aligned model (attach a
  LoRA, install a guidance rule, ...); returns the files whose content identifies the aligned model (render keys);
- ``combine``: optional guidance rule for sampling (``safealign.families.sampling``), None for weight-space methods;
- ``edits_base_weights`` (optional, default False): ``attach`` overwrites base weights instead of adding adapters
  (UCE), so the unaligned model cannot be had by disabling adapters; the white-box attack then loads it apart.

``dvc exp run -S method=<name>`` switches it: only `align` and `evaluate` re-run, the experts stay cached.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from safealign.core.registry import Registry


class Method(Protocol):
    name: str
    combine: Any  # a guidance rule (safealign.families.sampling.Guidance) or None

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]: ...

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]: ...


METHODS: Registry[Any] = Registry("method")
METHODS.add_lazy("safetydpo", "safealign.safetydpo.method:SafetyDPO")
METHODS.add_lazy("none", "safealign.baselines.none:NoAlignment")  # no alignment: the reference row
METHODS.add_lazy("sc_dpo", "safealign.sc_dpo.method:ScDpo")  # SC-DPO: one LoRA, cost-calibrated loss (safealign/sc_dpo)
METHODS.add_lazy("psa", "safealign.psa.method:Psa")  # PSA: user-conditioned cross-attention branch (safealign/psa)
METHODS.add_lazy("routed_experts", "safealign.psa.router:RoutedExperts")  # per user, the experts of their bans merged
METHODS.add_lazy("esd_u", "safealign.baselines.esd:EsdU")  # ESD-u: LoRA on all but cross-attention (safealign/baselines)
METHODS.add_lazy("esd_x", "safealign.baselines.esd:EsdX")  # ESD-x: LoRA on cross-attention only
METHODS.add_lazy("uce", "safealign.baselines.uce:UnifiedConceptEditing")  # UCE: closed-form cross-attention edit
METHODS.add_lazy("sld", "safealign.baselines.sld:SafeLatentDiffusion")  # SLD: safety guidance at sampling time
METHODS.add_lazy("negative_prompt", "safealign.baselines.negative_prompt:NegativePrompt")  # concept words as uncond
