"""Stage `base`: make the base model available and measure it.

For the toy family this pretrains the tiny text-to-image model (deterministic for params.seed); for real
families it checks the local weights named in params and records their hashes.

    python -m stages.base      # -> models/base/, metrics/base.json, plots/base_samples.png (toy)
"""
from __future__ import annotations

import sys
import time

from safealign.core.cli import run
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import BASE, METRICS, PLOTS
from safealign.core.runtime import setup_runtime
from safealign.families import get_family


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    t0 = time.time()
    metrics = get_family(params.model.family).prepare_base(params, BASE, PLOTS, device)
    write_json(METRICS / "base.json", metrics)  # no wall time here: metrics must be reproducible
    print(f"base: {metrics.get('accuracy', {})} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
