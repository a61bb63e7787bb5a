"""Stage `align`: build the aligned model that `evaluate` scores, with the method named by `method`.

    python -m stages.align    # -> models/aligned/, metrics/align.json

Methods: ``safealign.methods.METHODS`` (``safetydpo``: the merged LoRA of the experts). Switching ``method``
re-runs this stage and `evaluate` only; what other stages built stays cached.
"""
from __future__ import annotations

import sys
import time

from safealign.core.cli import run
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import ALIGNED, METRICS
from safealign.core.runtime import setup_runtime
from safealign.methods import METHODS


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    t0 = time.time()
    info = METHODS.get(params.method)().build(params, ALIGNED, device)
    seconds = time.time() - t0  # the time to build the method (wall clock, on this machine)
    write_json(METRICS / "align.json", {"method": params.method, **info, "build_seconds": seconds})
    print(f"align: {params.method} -> {ALIGNED} in {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
