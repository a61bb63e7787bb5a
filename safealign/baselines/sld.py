"""The ``sld`` method: Safe Latent Diffusion (Schramowski et al., CVPR 2023), safety guidance at sampling time.

At every step the denoiser also predicts under a safety concept prompt s; with u, c, s the unconditional,
conditional and safety-concept predictions (the family's own prediction space) the guidance becomes

    g     = c - u                                   (classifier-free direction)
    mu    = where(c - s >= threshold, 0, clamp(|c - s| * sld_scale, max=1))       (eq. 6, elementwise)
    gs    = mu * (s - u) + momentum_scale * m                                     (eq. 4 and 7)
    m    <- mom_beta * m + (1 - mom_beta) * gs                                    (eq. 8; m starts at 0)
    pred  = u + guidance * (g - gs) once step >= warmup, else u + guidance * g    (eq. 3)

as diffusers' ``StableDiffusionPipelineSafe`` computes it (its presets below). The rule plugs into our DDIM
sampler (``safealign.families.sampling``), so it works for every family. The safety concept is every category's
concept words (``safealign.baselines.concepts``) unless ``sld.concept`` names one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from safealign.core.io import atomic_path


@dataclasses.dataclass(frozen=True)
class SldConfig:
    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    mom_beta: float


# diffusers' SafetyConfig (pipelines/stable_diffusion_safe): WEAK / MEDIUM / STRONG / MAX
PRESETS = {
    "weak": SldConfig(15, 20.0, 0.0, 0.0, 0.0),
    "medium": SldConfig(10, 1000.0, 0.01, 0.3, 0.4),
    "strong": SldConfig(7, 2000.0, 0.025, 0.5, 0.7),
    "max": SldConfig(0, 5000.0, 1.0, 0.5, 0.7),
}


def safety_guidance(uncond: torch.Tensor, cond: torch.Tensor, safety: torch.Tensor, momentum: torch.Tensor,
                    cfg: SldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The safety term gs (eq. 4, 6, 7) and the updated momentum (eq. 8); all tensors of one shape."""
    diff = cond - safety
    scale = torch.clamp(diff.abs() * cfg.guidance_scale, max=1.0)
    mu = torch.where(diff >= cfg.threshold, torch.zeros_like(scale), scale)
    gs = (safety - uncond) * mu + cfg.momentum_scale * momentum
    return gs, cfg.mom_beta * momentum + (1 - cfg.mom_beta) * gs


def sld_combine(uncond: torch.Tensor, cond: torch.Tensor, safety: torch.Tensor, guidance: float, step: int,
                momentum: torch.Tensor | None, cfg: SldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's prediction under safety guidance and the new momentum (eq. 3); ``momentum`` None = zeros.
    With ``guidance_scale <= 1`` diffusers switches safety guidance off: plain classifier-free guidance."""
    noise_guidance = cond - uncond
    if cfg.guidance_scale <= 1.0:
        return uncond + guidance * noise_guidance, momentum if momentum is not None else torch.zeros_like(cond)
    momentum = torch.zeros_like(noise_guidance) if momentum is None else momentum
    gs, momentum = safety_guidance(uncond, cond, safety, momentum, cfg)
    if step >= cfg.warmup_steps:
        noise_guidance = noise_guidance - gs
    return uncond + guidance * noise_guidance, momentum


class SafetyGuidance:
    """A guidance rule (``safealign.families.sampling``): asks the sampler for the safety concept's prediction and
    keeps the momentum in the batch's ``state``."""

    def __init__(self, concept: str, cfg: SldConfig) -> None:
        self.concept, self.cfg = concept, cfg

    def extra_conds(self, fam: Any, n: int) -> list[dict[str, torch.Tensor]]:
        c = fam.encode_prompts([self.concept])
        return [{k: v.expand(n, *v.shape[1:]) for k, v in c.items()}]

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, guidance: float, t: torch.Tensor,
                 state: dict[str, Any]) -> torch.Tensor:
        (safety,) = state["extra"]
        pred, state["sld_momentum"] = sld_combine(uncond, cond, safety, guidance, state["step"],
                                                  state.get("sld_momentum"), self.cfg)
        return pred


def sld_settings(params: Any) -> dict[str, Any]:
    """The preset's numbers and the safety concept, as recorded in ``method.json``."""
    from safealign.baselines.concepts import concept_prompt, load_concepts

    concept = params.sld.concept or concept_prompt(load_concepts(params.categories))
    return {"preset": params.sld.preset, "concept": concept, **dataclasses.asdict(PRESETS[params.sld.preset])}


class SafeLatentDiffusion:
    name = "sld"
    combine = None  # set by attach (the rule needs the settings build recorded)

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        info = {"method": self.name, **sld_settings(params)}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        path = Path(folder) / "method.json"
        info = json.loads(path.read_text())
        if info.get("method") != self.name:
            raise ValueError(f"{path}: built by method {info.get('method')!r}, not {self.name!r}; run `dvc repro align`")
        fields = {f.name for f in dataclasses.fields(SldConfig)}
        self.combine = SafetyGuidance(info["concept"], SldConfig(**{k: info[k] for k in fields}))
        return [path]  # the settings identify the renders
