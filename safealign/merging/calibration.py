"""Co-Merge's per-expert input statistics: the mean |x| entering every adapted layer while one expert alone is
attached, gathered with forward hooks on calibration pairs (the expert's own category's, or all categories')
at four timesteps from early to late."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from safealign.families.base import Family
from safealign.families.lora import LORA_PREFIX
from safealign.training.data import Cached, load_pairs


@torch.no_grad()
def input_stats(fam: Family, expert: Path, category: str, params: Any,
                cached: Cached | None = None) -> dict[str, torch.Tensor]:
    """Mean |x_k| of the input of every adapted layer while ``expert`` is attached, keyed `unet.<module>`.
    ``cached``: the render cache from ``read_cache()``, read once for all experts."""
    unet = fam.raw_unet
    before = unet.active_adapters() if getattr(unet, "_hf_peft_config_loaded", False) else []
    fam.load_lora(expert, name="calib")
    data = load_pairs(category if params.merge.calibration == "own" else "all", params.categories, cached)
    k = min(len(data), params.prompts.calibration_per_category)
    gen = torch.Generator().manual_seed(params.seed)
    batch = data.select(torch.randperm(len(data), generator=gen)[:k])
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_module, inputs, _output):
            x = inputs[0].detach().float().abs()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).sum(0)
            counts[name] = counts.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return fn

    handles = [m.register_forward_hook(hook(LORA_PREFIX + n)) for n, m in fam.lora_modules().items()]
    try:
        for t in np.linspace(0, fam.num_train_timesteps - 1, 4).round().astype(int):  # early to late steps
            x0 = batch.x0_l.to(fam.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            tt = torch.full((k,), int(t), device=fam.device)
            fam.predict(fam.add_noise(x0, noise, tt), tt, {c: v.to(fam.device) for c, v in batch.cond.items()})
    finally:
        for h in handles:
            h.remove()
        if before:  # the adapters active before, back on first (peft warns when the active one is deleted)
            unet.set_adapter(before)
        unet.delete_adapters("calib")
    return {name: sums[name] / counts[name] for name in sums}
