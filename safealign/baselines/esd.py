"""The ``esd_u`` and ``esd_x`` methods: Erased Stable Diffusion (Gandikota et al., ICCV 2023) as a LoRA.

The trained model's prediction under a concept prompt c is pulled to the frozen model's negatively guided one,

    target = p(x_t, empty) - eta * (p(x_t, c) - p(x_t, empty))      (the frozen model = adapters disabled)
    loss   = mean |p_theta(x_t, c) - target|^2

where p is the family's own prediction (noise, or velocity for v-prediction families: with x_t fixed the velocity
is an affine function of the noise, and the target's weights (1 + eta, -eta) sum to 1, so the target is the same
point in either space). x_t comes as in ESD's code: a random number of DDIM steps from noise with the model being
trained under c (``esd.sample_steps`` DDIM steps in all, CFG ``esd.start_guidance``), and t is that step's timestep. ``esd_u`` adapts every layer kind but
cross-attention (``esd.targets_u``; the paper's choice for nudity), ``esd_x`` cross-attention only
(``esd.targets_x``). The concept prompts (``esd.prompts``) come from ``safealign.baselines.concepts``.
Writes ``models/aligned/lora.safetensors``; ``attach`` loads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.core.io import atomic_path
from safealign.core.runtime import poll_threads

LORA = "lora.safetensors"


def esd_target(pred_empty: torch.Tensor, pred_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target: the frozen model's prediction guided away from the concept by eta."""
    return pred_empty - eta * (pred_concept - pred_empty)


def esd_loss(fam: Any, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
             empty: dict[str, torch.Tensor], eta: float) -> torch.Tensor:
    """The ESD loss of one batch; gradient only through the adapters of ``fam``."""
    with torch.no_grad(), fam.adapters_disabled():
        both = {k: torch.cat([empty[k], cond[k]]) for k in cond}
        pred_empty, pred_concept = fam.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    target = esd_target(pred_empty, pred_concept, eta)
    return torch.nn.functional.mse_loss(fam.predict(x_t, t, cond).float(), target.float())


@torch.no_grad()
def partial_sample(fam: Any, sched: Any, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
                   stop: int, guidance: float, generator: torch.Generator) -> torch.Tensor:
    """x at the ``stop``-th timestep of ``sched``: ``stop`` DDIM steps from noise with CFG (current model)."""
    n = cond["encoder_hidden_states"].shape[0]
    x = torch.randn((n, *fam.latent_shape()), generator=generator).to(fam.device, fam.dtype) * sched.init_noise_sigma
    both = {k: torch.cat([empty[k], cond[k]]) for k in cond}
    for t in sched.timesteps[:stop]:
        tt = torch.full((2 * n,), int(t), device=fam.device)
        u, c = fam.predict(sched.scale_model_input(torch.cat([x, x]), t), tt, both).chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def concept_prompts(params: Any) -> list[str]:
    from safealign.baselines.concepts import load_concepts

    concepts = load_concepts(params.categories).values()
    if params.esd.prompts == "words":
        return [c.text for c in concepts]
    return sorted({p for c in concepts for p in c.unsafe_prompts})


class ErasedDiffusion:
    """ESD; ``variant`` "u" or "x" picks the adapted layers."""

    variant = "u"
    combine = None  # a weight-space method

    @property
    def name(self) -> str:
        return f"esd_{self.variant}"

    def targets(self, params: Any) -> tuple[str, ...]:
        return params.esd.targets_u if self.variant == "u" else params.esd.targets_x

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        from diffusers import DDIMScheduler

        from safealign.core.paths import BASE
        from safealign.families import get_family
        from safealign.families.lora import save_lora

        e = params.esd
        fam = get_family(params.model.family).from_params(params, BASE, device)
        fam.add_lora(e.rank, e.alpha, self.targets(params))
        opt = torch.optim.Adam(fam.lora_parameters(), lr=e.lr)
        sched = DDIMScheduler.from_config(fam.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(e.sample_steps)
        prompts = concept_prompts(params)
        gen = torch.Generator().manual_seed(params.seed * 1000 + (1 if self.variant == "u" else 2))
        losses = []
        for _ in tqdm(range(e.steps), desc=self.name, leave=False):
            poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
            rows = torch.randint(0, len(prompts), (e.batch_size,), generator=gen).tolist()
            stop = int(torch.randint(0, len(sched.timesteps), (1,), generator=gen))
            with torch.no_grad():
                cond = fam.encode_prompts([prompts[r] for r in rows])
                empty = fam.empty_cond(e.batch_size)
            x_t = partial_sample(fam, sched, cond, empty, stop, e.start_guidance, gen)
            t = torch.full((e.batch_size,), int(sched.timesteps[stop]), device=fam.device)
            loss = esd_loss(fam, x_t, t, cond, empty, e.eta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        save_lora(Path(out) / LORA, fam.lora_state_dict(), e.rank, e.alpha, self.targets(params), method=self.name,
                  esd=json.dumps(e.model_dump(), sort_keys=True))
        k = min(20, len(losses))
        info = {"method": self.name, **{f: getattr(e, f) for f in ("eta", "steps", "lr", "batch_size", "rank",
                                                                    "prompts")},
                "targets": list(self.targets(params)), "concept_prompts": len(prompts),
                "first20_loss": sum(losses[:k]) / k, "last20_loss": sum(losses[-k:]) / k}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        fam.load_lora(Path(folder) / LORA)
        return [Path(folder) / LORA]


class EsdU(ErasedDiffusion):
    variant = "u"


class EsdX(ErasedDiffusion):
    variant = "x"
