"""DVC remotes: a team shares results without re-running. Every artifact of a finished tiny project is pushed
to a local remote; a fresh `git clone` pulls them, `dvc status` is clean, and every output and metric is
byte-identical to the original."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import assert_dvc_clean, file_hashes, run_command, run_inline

ARTIFACTS = ("data/prompts/*.parquet", "data/render/**/*", "models/**/*", "data/eval/**/*", "metrics/**/*",
             "plots/*", "dvc.lock")


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_command(project, [sys.executable, "-m", "dvc", *args])


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def test_push_clone_pull_gives_every_artifact_back(tiny_reference: Path, tmp_path: Path) -> None:
    project = tmp_path / "team"
    shutil.copytree(tiny_reference, project, ignore=shutil.ignore_patterns("__pycache__", "checkpoints", ".cache"))
    run_inline(project, "train", "--category", "all")  # the one stage the tiny reference leaves out
    git(project, "init", "-q")
    git(project, "config", "user.email", "test@example.com")
    git(project, "config", "user.name", "test")
    dvc(project, "init", "-q")
    dvc(project, "commit", "-f")  # the pipeline already ran (tiny_reference): record it in dvc.lock
    assert_dvc_clean(dvc(project, "status", "--json").stdout)
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "shared", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "results")
    pushed = dvc(project, "push")
    assert any(remote.rglob("*")) and "pushed" in pushed.stdout

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "models/merged").exists()  # cached outputs are not in git
    dvc(clone, "pull")
    assert_dvc_clean(dvc(clone, "status", "--json").stdout)
    original = file_hashes(project, *ARTIFACTS)
    assert len([k for k in original if k.startswith("models/experts/")]) >= 7
    assert file_hashes(clone, *ARTIFACTS) == original
