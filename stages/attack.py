"""Stage `attack`: adversarial prompt sets against a target model (Ring-A-Bell, a white-box attack).

    python -m stages.attack   # -> data/attacks/<attack>.parquet, metrics/attacks.json

Target, budgets and banned words from params (`attack:`); library: ``safealign.attacks``. `evaluate` scores the
sets through ``evaluate.sets`` (``ring_a_bell``, ``whitebox``) on the base and the aligned model.
"""
from __future__ import annotations

import sys
import time

from safealign.core.cli import run
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import METRICS
from safealign.core.runtime import setup_runtime

ATTACKS_OUT = "data/attacks"


def main(params_path: str = "params.yaml") -> None:
    from pathlib import Path

    from safealign.attacks.run import run_attacks

    params = load_params(params_path)
    device = setup_runtime(params)
    t0 = time.time()
    metrics = run_attacks(params, device, Path(ATTACKS_OUT))
    metrics["seconds"] = time.time() - t0
    write_json(METRICS / "attacks.json", metrics)
    print(f"attack: {', '.join(params.attack.methods)} against {params.attack.target} in {metrics['seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
