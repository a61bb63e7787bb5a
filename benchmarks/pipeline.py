"""Benchmark of the whole default pipeline: each stage's wall time from a fresh clone with an empty DVC cache,
on a quiet machine and with one CPU kept busy by a burner process, side by side in one run.

    python benchmarks/pipeline.py                    # the params.yaml of HEAD (minutes per pass)
    python benchmarks/pipeline.py --tiny             # the tests' tiny settings: a smoke run of this script
    python benchmarks/pipeline.py --no-busy          # the quiet pass only
    python benchmarks/pipeline.py --no-quiet         # the busy pass only

Each pass clones the repository's HEAD into a scratch folder (``git clone``, so uncommitted edits are not
measured), points DVC at an empty cache of its own and runs ``dvc repro``; a stage's time runs from DVC's
"Running stage" line to the next stage's (or the end). The busy pass starts one process that spins on one core
for the whole pass. Run it on a machine doing nothing else: any other job distorts both passes.
Last stdout line: one JSON object {"quiet": {stage: s, ..., "total": s}, "busy": {...}, "busy_over_quiet": x}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")


def burn() -> None:  # one busy core
    while True:
        pass


def tiny(clone: Path) -> None:
    """The test suite's tiny settings (tests/conftest.py TINY), for a quick check of this script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", clone / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    sys.modules["bench_conftest"] = conftest  # its dataclasses look their module up
    spec.loader.exec_module(conftest)  # the clone's own, so params match the code measured
    conftest.write_params(clone)  # the clone's params.yaml with TINY applied
    subprocess.run(["git", "commit", "-qam", "tiny"], cwd=clone, check=True)


def one_pass(workdir: Path, name: str, use_tiny: bool) -> dict[str, float]:
    clone = workdir / name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for cmd in (["git", "config", "user.email", "bench@local"], ["git", "config", "user.name", "bench"]):
        subprocess.run(cmd, cwd=clone, check=True)
    if use_tiny:
        tiny(clone)
    subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(workdir / f"{name}-cache")],
                   cwd=clone, check=True)
    times: dict[str, float] = {}
    t0 = last = time.perf_counter()
    stage = None
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=clone, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**_env(), "TQDM_DISABLE": "1"})
    for line in proc.stdout:  # type: ignore[union-attr]
        m = RUNNING.search(line)
        if m:
            now = time.perf_counter()
            if stage:
                times[stage] = now - last
                print(f"[{name}] {stage}: {times[stage]:.1f} s", file=sys.stderr, flush=True)
            stage, last = m.group(1), now
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed in {clone} (status {proc.returncode})")
    end = time.perf_counter()
    if stage:
        times[stage] = end - last
        print(f"[{name}] {stage}: {times[stage]:.1f} s", file=sys.stderr, flush=True)
    times["total"] = end - t0
    print(f"[{name}] total: {times['total']:.1f} s", file=sys.stderr, flush=True)  # a pass stopped later still reports
    return times


def _env() -> dict[str, str]:
    """This interpreter's environment, its folder first on PATH (dvc.yaml's `python` is then this one)."""
    import os

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny settings (a smoke run of the script)")
    ap.add_argument("--no-busy", action="store_true", help="skip the pass with one busy core")
    ap.add_argument("--no-quiet", action="store_true", help="skip the quiet pass")
    ap.add_argument("--workdir", help="scratch folder (default: a new temporary one)")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    out = {} if args.no_quiet else {"quiet": one_pass(workdir, "quiet", args.tiny)}
    if not args.no_busy:
        burner = mp.Process(target=burn, daemon=True)
        burner.start()
        try:
            out["busy"] = one_pass(workdir, "busy", args.tiny)
        finally:
            burner.terminate()
        if "quiet" in out:
            out["busy_over_quiet"] = out["busy"]["total"] / out["quiet"]["total"]
    stages = list(out.get("quiet") or out.get("busy") or {})
    print(f"{'stage':28s} {'quiet s':>9s} {'busy s':>9s}")
    for s in stages:
        cells = [out.get(p, {}).get(s) for p in ("quiet", "busy")]
        print(f"{s:28s} " + " ".join(f"{'' if c is None else f'{c:.1f}':>9s}" for c in cells))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
