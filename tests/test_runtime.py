"""The threading policy (safealign/core/runtime.py): passive OpenMP waiting, and the thread count."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from safealign.core.errors import ParamsError
from safealign.core.params import load_params
from safealign.core.runtime import choose_threads

from conftest import ROOT, read_yaml


def _env_without(key: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != key}


def test_importing_safealign_sets_passive_waiting_before_torch_loads() -> None:
    code = ("import sys, os; import safealign; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=_env_without("OMP_WAIT_POLICY"), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_a_stage_command_gets_passive_waiting_too() -> None:
    # a stage imports safealign (its first import) before torch: the policy is in place when OpenMP loads
    code = ("import sys, os; import stages.render; assert 'torch' in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=_env_without("OMP_WAIT_POLICY"), capture_output=True,
                         text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE", out.stderr


def test_a_wait_policy_the_user_set_is_kept() -> None:
    code = "import os, safealign; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


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
