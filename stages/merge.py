"""Stage `merge`: merge the per-category experts into one LoRA with the rule named by `merge.method`.

    python -m stages.merge    # -> models/merged/{lora,delta}.safetensors, metrics/merge.json

Rules live in stages.merging (a registry); `single` takes the `all` expert unmerged (the All-single baseline).
Co-Merge needs per-expert input statistics: the mean |x| entering every adapted layer, gathered with forward
hooks while that expert alone is attached, on calibration pairs (its own category's, or all categories').
The merged full delta is kept, and re-factored to a rank-`merge.rank` LoRA by truncated SVD whose relative
reconstruction error goes into the metrics.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from stages.config import Params, load_params, setup_runtime
from stages.family import Family, get_family, read_lora, save_lora
from stages.io import atomic_path, write_json
from stages.merging import MergeOptions, merge_state_dicts
from stages.train import BASE, load_pairs, read_cache

EXPERTS = Path("models/experts")
OUT = Path("models/merged")


@torch.no_grad()
def input_stats(fam: Family, expert: Path, category: str, params: Params,
                cached: tuple | None = None) -> dict[str, torch.Tensor]:
    """Mean |x_k| of the input of every adapted layer while ``expert`` is attached, keyed `unet.<module>`.
    ``cached``: the render cache from ``read_cache()``, read once for all experts."""
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

    handles = [m.register_forward_hook(hook("unet." + n)) for n, m in fam.lora_modules().items()]
    try:
        for t in np.linspace(0, fam.num_train_timesteps - 1, 4).round().astype(int):  # early to late steps
            x0 = batch.x0_l.to(fam.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            tt = torch.full((k,), int(t), device=fam.device)
            fam.predict(fam.add_noise(x0, noise, tt), tt, {c: v.to(fam.device) for c, v in batch.cond.items()})
    finally:
        for h in handles:
            h.remove()
        fam.raw_unet.delete_adapters("calib")
    return {name: sums[name] / counts[name] for name in sums}


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    m = params.merge
    experts = ["all"] if m.method == "single" else list(params.categories)
    loaded = [read_lora(EXPERTS / f"{c}.safetensors") for c in experts]
    rank, alpha = int(loaded[0][1]["rank"]), float(loaded[0][1]["alpha"])
    stats = None
    if m.method == "co_merge":
        fam = get_family(params.model.family).from_params(params, BASE, device)
        cached = read_cache()
        stats = [input_stats(fam, EXPERTS / f"{c}.safetensors", c, params, cached) for c in experts]
    rule = "linear" if m.method == "single" else m.method  # one expert: every rule gives it back
    merged, deltas, errors = merge_state_dicts(
        [s for s, _ in loaded], alpha, rank, rule, MergeOptions(density=m.density, scale=m.scale, seed=params.seed),
        stats, m.rank)
    targets = loaded[0][1]["targets"].split(",")
    save_lora(OUT / "lora.safetensors", merged, m.rank, float(m.rank), targets, method=m.method,
              experts=",".join(experts))
    with atomic_path(OUT / "delta.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp), metadata={"method": m.method})
    err = np.array(list(errors.values()))
    norms = {k: float(v.norm()) for k, v in deltas.items()}
    write_json(Path("metrics/merge.json"), {
        "method": m.method, "experts": experts, "svd_rank": m.rank,
        "svd_rel_error": {"mean": float(err.mean()), "max": float(err.max())},
        "delta_norm": float(np.sqrt(sum(v * v for v in norms.values()))),
    })
    print(f"merge: {m.method} of {len(experts)} expert(s); SVD rank {m.rank} error mean {err.mean():.4f} max {err.max():.4f}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
