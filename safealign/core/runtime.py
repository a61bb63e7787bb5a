"""Threads and devices: the one place that turns ``params.runtime`` into torch settings.

The threading policy (issue 17), all of it here:

- **Passive OpenMP waiting.** ``import safealign`` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment
  already sets it) before torch loads its OpenMP runtime: a thread that reaches a barrier first sleeps instead of
  spinning. With the default spin-wait, two torch threads beside one busy process ran toy pretraining 4.3x slower
  than on a quiet machine (measured: 0.75 against 3.20 steps/s); with passive waiting, 1.8x (1.69 against 3.09
  steps/s), and no measurable loss on a quiet machine. In the whole default pipeline beside one busy core
  (``benchmarks/pipeline.py``) ``base`` ran 1.9x slower, ``render`` 2.5x and the experts' LoRA training still
  2.8-3.5x: on a shared machine, one thread (or ``auto``) is the setting that loses nothing.
- **Thread count.** ``runtime.threads``: ``auto`` (the default): the cores idle when the stage starts (sampled
  from ``/proc/stat`` over 0.2 s, rounded, at least 1, at most the cores this process may use). On a quiet 2-core
  machine that is 2; beside one busy process it is 1, and one thread loses nothing to a busy core, so a busy
  core costs at most its share. Or a number (0 for torch's default). Rendering gives the same bytes at any
  thread count (measured on the toy), but training's float reductions depend on it: the committed ``dvc.lock``
  (made with 2 threads) reproduces byte for byte where the stage ran with 2, and ``runtime.threads: 2`` pins
  that on a loaded machine (at the cost of the slowdown above).
- Tests and CI run with ``OMP_NUM_THREADS=1`` and ``runtime.threads: 1`` (unaffected by either).

Processes (``runtime.launcher``, docs/scaling.md): a stage launched as several processes (``accelerate launch``,
``torchrun``: ``WORLD_SIZE`` > 1) renders its share of the batches (``process_shard``), and on GPUs each process
takes the device of its ``LOCAL_RANK``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

WAIT_POLICY = "PASSIVE"


def prefer_passive_wait() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless already set; effective only before torch is first imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def idle_cores(window: float = 0.2) -> float | None:
    """How many cores were idle over ``window`` seconds (``/proc/stat``); None where that cannot be read."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def choose_threads(setting: int | str, idle: float | None = None, cores: int | None = None) -> int:
    """The torch thread count for ``runtime.threads`` (0 = leave torch's default, returned as 0)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores() if cores is None else cores
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where a GPU is present, else 'cpu'; anything else as given. A bare 'cuda' in a process
    launched as one of several (``LOCAL_RANK`` set) is that process's GPU, ``cuda:<LOCAL_RANK>``."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def process_shard(device: Any = "cpu") -> tuple[int, int, Callable[[], None]]:
    """(rank, number of processes, barrier) of the processes a stage was launched as: ``(0, 1, no-op)`` unless
    launched by ``accelerate launch`` / ``torchrun`` with ``WORLD_SIZE`` > 1, where accelerate's state joins them
    (gloo for a CPU ``device``, as the train stage's Accelerator does; nccl on GPUs) and the barrier waits for
    every process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=str(device).startswith("cpu"))
    return state.process_index, state.num_processes, state.wait_for_everyone


def setup_runtime(params: Any) -> str:
    """Set torch's thread count from ``runtime.threads`` and pick the device; returns the device string."""
    import torch

    setting = params.runtime.threads
    threads = choose_threads(setting, idle_cores() if setting == "auto" else None)
    if threads:
        torch.set_num_threads(threads)
    return resolve_device(params.runtime.device)
