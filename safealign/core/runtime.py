"""Threads and devices: the one place that turns ``params.runtime`` into torch settings.

The threading policy (issue 17), all of it here:

- **Short OpenMP spinning.** ``import safealign`` sets ``GOMP_SPINCOUNT=10000`` (unless the environment already
  sets it or ``OMP_WAIT_POLICY``) before torch loads libgomp: a thread that reaches a barrier first spins about
  10 microseconds, then sleeps. The toy model's ops are small and many, so a thread that sleeps at once
  (``OMP_WAIT_POLICY=PASSIVE``, the policy until 2026-12-02) pays a futex wake-up per op; one that spins long
  (libgomp's default, 300000) holds its core when another process needs it. ``python benchmarks/wait_policy.py``
  (2 quiet cores, Intel Xeon, 2026-12-02): pretraining at 2 threads took 0.138 s a step with 10000, 0.267 s
  passive (slower than 1 thread: 0.207 s), 0.139 s with libgomp's default; beside one busy core at 2 threads,
  0.57 s with 10000, 0.31 s passive, 2.66 s with the default. One thread is 0.21 s quiet or busy, whatever the
  policy. So the spin is short, and the thread count (next) keeps 2 threads off a busy core.
- **Thread count.** ``runtime.threads``: ``auto`` (the default): the cores idle when the stage starts (sampled
  from ``/proc/stat`` over 0.2 s, rounded, at least 1, at most the cores this process may use). On a quiet 2-core
  machine that is 2; beside one busy process it is 1, and one thread loses nothing to a busy core, so a busy
  core costs at most its share. While the stage runs, its long loops (pretraining, training, rendering, attacks)
  call ``poll_threads``: every 2 s it measures the cores that other processes use (``/proc/stat`` less this
  process's own CPU time) and sets the thread count again by the same rule, so load that arrives (or leaves)
  mid-stage moves it. Or a number (0 for torch's default), never changed. Rendering gives the same bytes at any
  thread count (measured on the toy), but training's float reductions depend on it: the committed ``dvc.lock``
  reproduces byte for byte where the stage ran with the same count on the same kind of CPU, and
  ``runtime.threads: 2`` pins the count on a loaded machine (at the cost of the slowdown above).
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

SPIN_COUNT = "10000"
POLL_SECONDS = 2.0


def prefer_short_spin() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the environment sets it or ``OMP_WAIT_POLICY``; effective only before torch
    is first imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


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


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def choose_threads(setting: int | str, idle: float | None = None, cores: int | None = None) -> int:
    """The torch thread count for ``runtime.threads`` (0 = leave torch's default, returned as 0)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores() if cores is None else cores
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


class ThreadGovernor:
    """``runtime.threads: auto`` while a stage runs: ``poll`` (cheap; acts at most every ``interval`` seconds)
    measures the cores other processes used since the last measurement and sets the thread count by
    ``choose_threads``. The clock, the CPU counters and the setter are arguments so that tests can drive it."""

    def __init__(self, threads: int, cores: int | None = None, interval: float = POLL_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 system: Callable[[], tuple[int, int] | None] = _cpu_times,
                 own: Callable[[], float] = _own_cpu_seconds,
                 set_threads: Callable[[int], None] | None = None, tick: float | None = None) -> None:
        self.threads, self.cores, self.interval = threads, cores or usable_cores(), interval
        self.clock, self.system, self.own = clock, system, own
        self.set_threads = set_threads or _torch_set_threads
        self.tick = tick or float(os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self.changes: list[tuple[int, int, float]] = []  # (from, to, other processes' cores)
        self._mark()

    def _mark(self, sample: tuple[float, tuple[int, int] | None, float] | None = None) -> None:
        self.t, self.cpu, self.mine = sample or (self.clock(), self.system(), self.own())

    def others(self) -> float | None:
        """Cores that other processes kept busy since the last mark (None where /proc/stat cannot be read)."""
        return self._others((self.clock(), self.system(), self.own()))

    def _others(self, sample: tuple[float, tuple[int, int] | None, float]) -> float | None:
        now, cpu, mine = sample
        wall = now - self.t
        if cpu is None or self.cpu is None or wall <= 0 or cpu[1] == self.cpu[1]:
            return None
        busy = ((cpu[1] - cpu[0]) - (self.cpu[1] - self.cpu[0])) / self.tick / wall  # cores busy, all processes
        return max(0.0, busy - (mine - self.mine) / wall)

    def poll(self) -> int:
        now = self.clock()
        if now - self.t < self.interval:  # the cheap path: one clock read
            return self.threads
        sample = (now, self.system(), self.own())  # one reading serves the measurement and the next mark
        others = self._others(sample)
        self._mark(sample)
        if others is not None:
            want = choose_threads("auto", self.cores - others, self.cores)
            if want != self.threads:
                self.changes.append((self.threads, want, round(others, 2)))
                self.set_threads(want)
                self.threads = want
        return self.threads


def _torch_set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


_GOVERNOR: ThreadGovernor | None = None


def poll_threads() -> None:
    """Called from long loops: re-sets the thread count under ``runtime.threads: auto`` (a no-op otherwise)."""
    if _GOVERNOR is not None:
        _GOVERNOR.poll()


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

    global _GOVERNOR
    setting = params.runtime.threads
    threads = choose_threads(setting, idle_cores() if setting == "auto" else None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(params.runtime.device)
    _GOVERNOR = ThreadGovernor(threads) if setting == "auto" and device == "cpu" else None
    return device
