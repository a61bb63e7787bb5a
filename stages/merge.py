"""Stage `merge`: merge the per-category experts into one LoRA with the rule named by `merge.method`.

    python -m stages.merge    # -> models/merged/{lora,delta}.safetensors, metrics/merge.json

Rules: ``safealign.merging`` (a registry); `single` takes the `all` expert unmerged (the All-single baseline).
Co-Merge needs per-expert input statistics (``safealign.merging.calibration``). The merged full delta is kept,
and re-factored to a rank-`merge.rank` LoRA by truncated SVD whose relative error goes into the metrics.
"""
from __future__ import annotations

import sys

import numpy as np
from safetensors.torch import save_file

from safealign.core.cli import run
from safealign.core.io import atomic_path, write_json
from safealign.core.params import load_params
from safealign.core.paths import BASE, EXPERTS, MERGED, METRICS
from safealign.core.runtime import setup_runtime
from safealign.families import get_family
from safealign.families.lora import read_lora, save_lora
from safealign.merging.calibration import input_stats
from safealign.merging.deltas import merge_state_dicts
from safealign.merging.rules import MergeOptions
from safealign.training.data import read_cache


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
    save_lora(MERGED / "lora.safetensors", merged, m.rank, float(m.rank), targets, method=m.method,
              experts=",".join(experts))
    with atomic_path(MERGED / "delta.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp), metadata={"method": m.method})
    err = np.array(list(errors.values()))
    norms = {k: float(v.norm()) for k, v in deltas.items()}
    write_json(METRICS / "merge.json", {
        "method": m.method, "experts": experts, "svd_rank": m.rank,
        "svd_rel_error": {"mean": float(err.mean()), "max": float(err.max())},
        "delta_norm": float(np.sqrt(sum(v * v for v in norms.values()))),
    })
    print(f"merge: {m.method} of {len(experts)} expert(s); SVD rank {m.rank} error mean {err.mean():.4f} max {err.max():.4f}")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
