"""Stage `report`: one self-contained HTML page of the results, ``report/index.html``.

    python -m stages.report [--experiments FILE]   # FILE: saved `dvc exp show --json` output

Every method's metrics side by side (base vs aligned, and the experiments of ``dvc exp show --json`` when there are
any), IP per category, training curves, the evaluation grid with flagged images blurred, and the protocol of
every number. Images are inlined, so the page needs no network. The stage is always re-run by ``dvc repro``
(experiments change without any file it depends on changing). Library: ``safealign.report``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from safealign.core.cli import run
from safealign.core.io import atomic_path
from safealign.core.paths import ALIGNED, METRICS, PLOTS
from safealign.report.build import build

REPORT = Path("report/index.html")


def exp_show(path: str | None) -> tuple[object, str]:
    """``dvc exp show --json`` (from a file, or run here); (None, why) if it cannot be had."""
    if path:
        return json.loads(Path(path).read_text()), ""
    try:
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True,
                              check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["dvc exp show failed"])[-1]
    return json.loads(proc.stdout or "null"), ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", help="a file holding `dvc exp show --json` output (default: run it)")
    args = ap.parse_args(argv)
    exps, why = exp_show(args.experiments)
    if why:
        print(f"report: no experiments table ({why})", file=sys.stderr)
    text = build(METRICS, PLOTS, exps, sorted(ALIGNED.glob("train*.csv")))
    with atomic_path(REPORT) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"report: {REPORT} ({len(text) // 1024} KiB)")


if __name__ == "__main__":
    sys.exit(run(main))
