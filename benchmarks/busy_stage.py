"""Benchmark of one expert stage (`train@<category>`) on a quiet machine and beside one busy core, for
``runtime.threads`` 2 and ``auto``, side by side in one run: what the threading policy (safealign/core/runtime.py)
does to the stage that suffered most under load (2.8-3.5x with 2 threads, passive waiting).

    python benchmarks/busy_stage.py                       # violence, 40 steps (needs `dvc repro render` done)
    python benchmarks/busy_stage.py --category hate --steps 100

Each run copies the stage's inputs from this workspace (models/base, data/render, params.yaml) into a fresh
scratch folder (so no checkpoint is resumed) and runs `python -m stages.train` there; the busy runs start one
process that spins on one core. Run it on a machine doing nothing else.
Last stdout line: one JSON object {"<threads>": {"quiet": s, "busy": s, "busy_over_quiet": x}, ...}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import burn  # noqa: E402  (one busy core, the same burner as the pipeline benchmark)


def run_stage(workdir: Path, category: str, steps: int, threads: int | str) -> float:
    project = Path(tempfile.mkdtemp(dir=workdir))
    for sub in ("models/base", "data/render"):
        shutil.copytree(ROOT / sub, project / sub)
    shutil.copytree(ROOT / "stages", project / "stages")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["steps"], raw["runtime"]["threads"] = steps, threads
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.train", "--category", category], cwd=project, env=env,
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="violence")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-busy-stage-"))
    out: dict[str, dict[str, float]] = {}
    for threads in (2, "auto"):
        quiet = run_stage(workdir, args.category, args.steps, threads)
        burner = mp.Process(target=burn, daemon=True)
        burner.start()
        try:
            busy = run_stage(workdir, args.category, args.steps, threads)
        finally:
            burner.terminate()
        out[str(threads)] = {"quiet": quiet, "busy": busy, "busy_over_quiet": busy / quiet}
        print(f"threads {threads}: quiet {quiet:.1f} s, busy {busy:.1f} s, {busy / quiet:.2f}x", file=sys.stderr,
              flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'runtime.threads':16s} {'quiet s':>9s} {'busy s':>9s} {'busy/quiet':>11s}")
    for k, v in out.items():
        print(f"{k:16s} {v['quiet']:9.1f} {v['busy']:9.1f} {v['busy_over_quiet']:10.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
