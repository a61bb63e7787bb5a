"""Stage `merge`: merge the per-category experts into one LoRA with the rule named by `merge.method`.

    python -m stages.merge    # -> models/merged/{lora,delta}.safetensors, metrics/merge.json

Rules: ``safealign.merging`` (a registry); `single` takes the `all` expert unmerged (the All-single baseline).
Co-Merge needs per-expert input statistics (``safealign.merging.calibration``). The merged full delta is kept,
and re-factored to a rank-`merge.rank` LoRA by truncated SVD whose relative error goes into the metrics.
The work is ``safealign.merging.experts`` (also used by methods that merge experts of their own).
"""
from __future__ import annotations

import sys

from safealign.core.cli import run
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import BASE, EXPERTS, MERGED, METRICS
from safealign.core.runtime import setup_runtime
from safealign.families import get_family
from safealign.merging.experts import merge_experts, save_merged
from safealign.training.data import read_cache


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    m = params.merge
    experts = ["all"] if m.method == "single" else list(params.categories)
    fam = cached = None
    if m.method == "co_merge":
        fam = get_family(params.model.family).from_params(params, BASE, device)
        cached = read_cache()
    merged = merge_experts([EXPERTS / f"{c}.safetensors" for c in experts], experts, params, fam, cached)
    save_merged(MERGED, merged, params)
    info = merged.summary(m.method, m.rank)
    write_json(METRICS / "merge.json", info)
    err = info["svd_rel_error"]
    print(f"merge: {m.method} of {len(experts)} expert(s); SVD rank {m.rank} error mean {err['mean']:.4f} "
          f"max {err['max']:.4f}")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
