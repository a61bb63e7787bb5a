"""Shared plumbing of the benchmarks: arguments, one fresh subprocess per variant, timing and peak memory.

Each variant (ours, reference) runs in its own Python process, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` (everything the variant allocated, weights included); on the CPU the peak
resident set size (``ru_maxrss``) minus the resident size after the imports, i.e. what building the models and
running the steps added.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from the repository root, without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd21", "sdxl"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "full"], help="tiny: shrunk configs for CPUs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (autocast on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per variant; the best rate counts")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: run one variant in this process
    return ap


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory of this process from now on, in MiB (see the module docstring for the two measures)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.baseline = rss_mib()

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.baseline

    @property
    def measure(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS minus RSS after imports (ru_maxrss)"


def seconds_per_call(fn: Callable[[], Any], calls: int, warmup: int, device: str) -> float:
    """Mean seconds per call after ``warmup`` calls: wall clock (synchronized) on CUDA; on the CPU this
    process's CPU time, which other jobs on a shared machine do not inflate (run with --threads 1)."""
    for _ in range(warmup):
        fn()
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (clock() - t0) / calls


def time_measure(device: str) -> str:
    return "wall clock, cuda synchronized" if device.startswith("cuda") else "process CPU time"


def autocast(args: argparse.Namespace) -> Any:
    """bf16/fp16 autocast on CUDA (the LoRA stays in fp32); nothing on the CPU in fp32."""
    enabled = args.device.startswith("cuda") and args.dtype != "fp32"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype, enabled=enabled)


def run_variants(args: argparse.Namespace, variants: dict[str, Callable[[argparse.Namespace], dict[str, Any]]],
                 env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """In a child (``--only name``): run that variant and print its JSON. In the parent: ``--rounds`` rounds of
    one child per variant, alternating, keeping each variant's best rate (a shared machine only slows runs down)."""
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(variants[args.only](args)))
        sys.exit(0)
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for name in variants:
            cmd = [sys.executable, sys.argv[0], *sys.argv[1:], "--only", name]
            child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name}: {json.dumps(run)}", flush=True)
            if name not in results or run["rate"] > results[name]["rate"]:
                results[name] = run
    return results


def summary(args: argparse.Namespace, results: dict[str, dict[str, Any]], rate_key: str) -> dict[str, Any]:
    """The final JSON line: settings, each variant's rate and peak memory, and the speedup of ours."""
    ours, ref = results["ours"], results["reference"]
    out = {"family": args.family, "size": args.size, "device": args.device, "dtype": args.dtype,
           "threads": args.threads, f"ours_{rate_key}": ours["rate"], f"reference_{rate_key}": ref["rate"],
           "speedup": ours["rate"] / ref["rate"], "ours_peak_mib": ours["peak_mib"],
           "reference_peak_mib": ref["peak_mib"], "memory_measure": ours["memory_measure"],
           "time_measure": time_measure(args.device)}
    out.update({k: v for k, v in ours.items() if k not in ("rate", "peak_mib", "memory_measure")})
    return out
