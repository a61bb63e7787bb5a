"""Sampling: DDIM with classifier-free guidance, for any family, with a replaceable guidance rule.

A guidance rule ``combine(uncond, cond, guidance, t, state) -> prediction`` turns the denoiser's unconditional
and conditional predictions of one step into the one the sampler follows; ``state`` is a dict the rule may keep
across the steps of one batch (a momentum, say). The default is classifier-free guidance,
``u + guidance * (c - u)``. Sampling-time methods (safety guidance) plug in here, so no family changes.

A rule may also carry two optional hooks, called once per batch with the family and the batch size n:
``unconditional(fam, n) -> Cond`` replaces the empty prompt's condition as ``uncond`` (a negative prompt), and
``extra_conds(fam, n) -> list[Cond]`` names further conditions the denoiser predicts in the same call, after
``uncond`` and ``cond`` (as diffusers batches them); their predictions reach the rule as ``state["extra"]``
(a list, in that order) and the step's index as ``state["step"]`` (safety guidance's warm-up).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from safealign.core.runtime import poll_threads

if TYPE_CHECKING:
    from safealign.families.base import Family


class Guidance(Protocol):
    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, guidance: float, t: torch.Tensor,
                 state: dict[str, Any]) -> torch.Tensor: ...


def classifier_free(uncond: torch.Tensor, cond: torch.Tensor, guidance: float, t: torch.Tensor,
                    state: dict[str, Any]) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): u + w (c - u)."""
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def ddim_render(fam: Family, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                batch_size: int = 64, progress: bool = False, combine: Guidance | None = None) -> np.ndarray:
    """Render prompts from seeds with DDIM ("trailing" spacing) and a guidance rule; uint8 (N, H, W, 3).

    Each row's initial noise comes from its own seed (``fam.initial_noise``), so a row renders the same whatever
    batch it lands in."""
    from diffusers import DDIMScheduler

    from safealign.families.base import cond_cat

    combine = combine or classifier_free
    out = []
    sched = DDIMScheduler.from_config(fam.scheduler.config, timestep_spacing="trailing")
    bar = tqdm(total=len(prompts), desc="render", disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        cond = fam.encode_prompts(p)
        uncond_hook, extra_hook = getattr(combine, "unconditional", None), getattr(combine, "extra_conds", None)
        extras = list(extra_hook(fam, len(p))) if extra_hook else []
        k = 2 + len(extras)  # predictions per row and step
        both = cond_cat([uncond_hook(fam, len(p)) if uncond_hook else fam.empty_cond(len(p)), cond, *extras])
        x = fam.initial_noise(s).to(fam.device, fam.dtype) * sched.init_noise_sigma
        sched.set_timesteps(steps)
        state: dict[str, Any] = {}
        for step, t in enumerate(sched.timesteps):
            poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
            xin = sched.scale_model_input(torch.cat([x] * k), t)
            tt = torch.full((k * len(p),), int(t), device=fam.device)
            u, c, *extra = fam.predict(xin, tt, both).chunk(k)
            state.update(step=step, extra=extra)
            x = sched.step(combine(u, c, guidance, t, state), t, x).prev_sample
        img = fam.decode(x).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        out.append((img * 255).round().astype(np.uint8))
        bar.update(len(p))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, fam.image_size, fam.image_size, 3), np.uint8)
