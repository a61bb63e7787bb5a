"""The threading policy (safealign/core/runtime.py): short OpenMP spinning, and the thread count (at a stage's
start and while it runs)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from safealign.core.errors import ParamsError
from safealign.core.params import load_params
from safealign.core.runtime import ThreadGovernor, choose_threads

from conftest import ROOT, read_yaml


POLICY = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _env(**set_: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in POLICY}, **set_}


PRINT = "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def test_importing_safealign_sets_a_short_spin_before_torch_loads() -> None:
    code = f"import sys, os; import safealign; assert 'torch' not in sys.modules; {PRINT}"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["10000", "None"]


def test_a_stage_command_gets_the_short_spin_too() -> None:
    # a stage imports safealign (its first import) before torch: the policy is in place when OpenMP loads
    code = f"import sys, os; import stages.render; assert 'torch' in sys.modules; {PRINT}"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1].split() == ["10000", "None"], out.stderr


@pytest.mark.parametrize(("given", "want"), [
    ({"OMP_WAIT_POLICY": "PASSIVE"}, ["None", "PASSIVE"]),   # a wait policy of the user's: no spin count added
    ({"GOMP_SPINCOUNT": "500"}, ["500", "None"]),            # a spin count of the user's is kept
])
def test_a_policy_the_user_set_is_kept(given, want) -> None:
    code = f"import os, safealign; {PRINT}"
    out = subprocess.run([sys.executable, "-c", code], env=_env(**given), capture_output=True, text=True, check=True)
    assert out.stdout.split() == want


class FakeMachine:
    """A 2-core machine for ThreadGovernor: time, /proc/stat's (idle, total) jiffies (100 a second a core) and
    this process's CPU seconds advance by what ``run`` says."""

    def __init__(self) -> None:
        self.now, self.idle, self.total, self.mine = 0.0, 0, 0, 0.0
        self.set_to: list[int] = []

    def run(self, seconds: float, mine: float, others: float, cores: int = 2) -> None:
        """``seconds`` of wall time with this process on ``mine`` cores and other processes on ``others``."""
        self.now += seconds
        self.total += round(100 * cores * seconds)
        self.idle += round(100 * max(0.0, cores - mine - others) * seconds)
        self.mine += mine * seconds

    def governor(self, threads: int) -> ThreadGovernor:
        return ThreadGovernor(threads, cores=2, interval=2.0, clock=lambda: self.now,
                              system=lambda: (self.idle, self.total), own=lambda: self.mine,
                              set_threads=self.set_to.append, tick=100)


def test_the_governor_drops_to_one_thread_when_another_process_takes_a_core_and_comes_back() -> None:
    m = FakeMachine()
    g = m.governor(2)
    m.run(3.0, mine=2.0, others=0.0)
    assert g.poll() == 2 and m.set_to == []            # quiet: nothing changes
    m.run(3.0, mine=1.3, others=0.7)                   # a burner arrives: it gets 0.7 of a core beside our 2 threads
    assert g.poll() == 1 and m.set_to == [1]
    assert g.changes == [(2, 1, 0.7)]
    m.run(3.0, mine=1.0, others=1.0)                   # still there: one thread stays
    assert g.poll() == 1 and m.set_to == [1]
    m.run(3.0, mine=1.0, others=0.0)                   # gone: our one thread alone on 2 cores, back to 2
    assert g.poll() == 2 and m.set_to == [1, 2]


def test_the_governor_measures_at_most_every_interval() -> None:
    m = FakeMachine()
    g = m.governor(2)
    m.run(1.0, mine=1.0, others=1.0)
    assert g.poll() == 2 and m.set_to == []            # 1 s < 2 s: no measurement yet
    m.run(1.5, mine=1.0, others=1.0)
    assert g.poll() == 1                               # the measurement covers the whole 2.5 s since the mark


def test_the_governor_counts_its_own_threads_as_its_own() -> None:
    m = FakeMachine()
    g = m.governor(2)
    m.run(4.0, mine=2.0, others=0.0)                   # both cores busy, all of it ours
    assert g.others() == pytest.approx(0.0)
    m2 = FakeMachine()
    g2 = m2.governor(2)
    m2.run(4.0, mine=1.0, others=0.5)
    assert g2.others() == pytest.approx(0.5)


def test_setup_runtime_installs_the_governor_only_for_auto(tmp_path) -> None:
    from safealign.core import runtime

    runtime.setup_runtime(params_with_threads(tmp_path, 1))
    assert runtime._GOVERNOR is None
    runtime.setup_runtime(params_with_threads(tmp_path, "auto"))
    try:
        assert isinstance(runtime._GOVERNOR, ThreadGovernor)
    finally:
        runtime._GOVERNOR = None
        runtime.setup_runtime(params_with_threads(tmp_path, 1))


@pytest.mark.parametrize(("setting", "idle", "cores", "want"), [
    (2, 0.0, 2, 2),          # a number is taken as it is, whatever the load
    (0, 0.0, 2, 0),          # 0: torch's default
    ("auto", 2.0, 2, 2),     # quiet 2-core machine: both
    ("auto", 1.1, 2, 1),     # one core busy: one thread
    ("auto", 1.6, 2, 2),     # rounds to the nearest core
    ("auto", 0.1, 2, 1),     # everything busy: still one
    ("auto", 7.9, 4, 4),     # never more than the cores this process may use
    ("auto", None, 3, 3),    # no /proc/stat: the usable cores
])
def test_choose_threads(setting, idle, cores, want) -> None:
    assert choose_threads(setting, idle, cores) == want


def params_with_threads(tmp_path, value) -> object:
    """The repository's params.yaml with ``runtime.threads: value``, loaded."""
    d = read_yaml((ROOT / "params.yaml").read_text())
    d["runtime"]["threads"] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_params(p)


@pytest.mark.parametrize("bad", [-1, "many", 1.5, True])
def test_a_bad_thread_setting_fails_naming_the_key(tmp_path, bad) -> None:
    with pytest.raises(ParamsError, match=r"runtime\.threads: must be 'auto' or a whole number >= 0"):
        params_with_threads(tmp_path, bad)


def test_auto_is_accepted(tmp_path) -> None:
    assert params_with_threads(tmp_path, "auto").runtime.threads == "auto"
