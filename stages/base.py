"""Stage `base`: make the base model available and measure it.

For the toy family this pretrains the tiny text-to-image model (deterministic for params.seed); for real
families it checks the local weights named in params and records their hashes.

    python -m stages.base      # -> models/base/, metrics/base.json, plots/base_samples.png
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from stages.config import load_params, setup_runtime
from stages.family import get_family
from stages.io import write_json


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    t0 = time.time()
    metrics = get_family(params.model.family).prepare_base(params, Path("models/base"), Path("plots"), device)
    write_json(Path("metrics/base.json"), metrics)  # no wall time here: metrics must be reproducible
    print(f"base: {metrics.get('accuracy', {})} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
