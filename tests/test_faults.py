"""Fault injection: stages killed with SIGKILL part-way, then run again, end exactly where an uninterrupted run
ends (same bytes on the CPU), with nothing duplicated and no temporary file left among the outputs.

Faults injected (each in a real ``python -m stages.<name>`` process, killed at a chosen point):
1. render, mid-batch, between a PNG's temporary write and its rename (a torn write is left behind);
2. train@violence after a checkpoint, with CSV rows logged past it;
3. train@violence in the middle of writing a checkpoint;
4. prompts (grammar backend) between its two tables: one written, the other only as a temporary file;
5. prompts (LLM recipe, openai backend against a local fake server) after 20 replies were journaled, then
   ``dvc repro prompts`` (the ``llm_fault_run`` fixture, shared with the security tests);
6. ``dvc repro render`` (DVC and its stage process together) mid-render, then ``dvc repro render`` again.
The re-run is in this process for 1-4 (the subprocess proves the kill is real; re-running in-process saves the
15 s of imports) and through DVC for 5 and 6.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    LLMRun,
    copy_project,
    count_lines,
    file_hashes,
    init_dvc,
    kill_when,
    make_project,
    run_command,
    run_inline,
    run_stage,
    temp_files,
)

RENDER_OUT = ("data/render/images/*.png", "data/render/*.parquet", "data/render/*.safetensors")


def journal_batches(folder: Path) -> list[str]:
    lines = [json.loads(x) for x in (folder / "journal.jsonl").read_text().splitlines() if x.strip()]
    return [x["batch"] for x in lines if "batch" in x]


def killable_mid_batch(images: Path) -> bool:
    """Two batches are journaled and a PNG of a later one is written but not yet renamed."""
    return (images / "journal.jsonl").exists() and len(journal_batches(images)) >= 2 and any(images.glob(".*.tmp"))


def dvc(project: Path, *args: str, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    return run_command(project, [sys.executable, "-m", "dvc", *args], log_name="dvc", **kw)


def assert_clean(project: Path) -> None:
    """No temporary file anywhere an output lives."""
    leftovers = [p for p in temp_files(project) if not p.startswith(("checkpoints", ".cache", ".dvc", ".git"))]
    assert leftovers == [], f"temporary files left among the outputs: {leftovers}"


# ---------------------------------------------------------------------------------------------- render
def test_render_killed_mid_batch_resumes_to_identical_images(tiny_reference: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", like=tiny_reference)
    copy_project(tiny_reference, project, "data/prompts", "models/base")
    images = project / "data/render/images"
    # Sleeping after each PNG's temporary write, before its rename, makes the kill leave a torn write behind.
    proc = run_stage(project, "render", background=True, delays={"PIL.Image:Image.save": 0.2})
    kill_when(proc, lambda: killable_mid_batch(images))
    done = journal_batches(images)
    assert 2 <= len(done) < 6, "killed part-way: 42 images are 6 batches of 8"
    assert any(images.glob(".*.png.tmp")), "the kill should interrupt a write"
    assert not (project / "data/render/cache.safetensors").exists()
    assert not (project / "data/render/manifest.parquet").exists()

    run_inline(project, "render")
    assert file_hashes(project, *RENDER_OUT) == file_hashes(tiny_reference, *RENDER_OUT)
    batches = journal_batches(images)
    assert len(batches) == len(set(batches)) == 6, "each batch journaled once"
    assert batches[: len(done)] == done, "finished batches were not redone"
    assert_clean(project)


# ----------------------------------------------------------------------------------------------- train
TRAIN_OUT = ("models/experts/violence.safetensors", "metrics/train/violence.csv", "metrics/train/violence.json")


@pytest.mark.parametrize("point", ["after_checkpoint", "mid_checkpoint"])
def test_train_killed_resumes_to_identical_expert(tiny_reference: Path, tmp_path: Path, point: str) -> None:
    project = make_project(tmp_path / "p", like=tiny_reference)
    copy_project(tiny_reference, project, "data/prompts", "models/base", "data/render")
    log, ckpts = project / "metrics/train/violence.csv", project / "checkpoints/violence"
    if point == "after_checkpoint":  # killed after step 5 was logged; the newest checkpoint is step 4
        delays = {"safealign.training.loop:write_csv_row": 0.3}
        ready = lambda: count_lines(log) >= 6  # noqa: E731 - header + 5 steps
    else:  # killed while the checkpoint of step 4 is half written
        delays = {"safealign.training.checkpoints:save_file": 0.5}
        ready = lambda: (ckpts / ".tmp_step_000004" / "lora.safetensors").exists()  # noqa: E731
    proc = run_stage(project, "train", "--category", "violence", background=True, delays=delays)
    kill_when(proc, ready)
    assert not (project / "models/experts/violence.safetensors").exists()
    assert (ckpts / "step_000002").is_dir()

    run_inline(project, "train", "--category", "violence")
    assert file_hashes(project, *TRAIN_OUT) == file_hashes(tiny_reference, *TRAIN_OUT)
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps == list(range(1, 7)), "every step logged once"
    assert_clean(project)


# --------------------------------------------------------------------------------------------- prompts
PROMPTS_OUT = ("data/prompts/*.parquet", "metrics/prompts.json")


def test_prompts_killed_between_tables_rewrites_both(tiny_reference: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", like=tiny_reference)
    out = project / "data/prompts"
    proc = run_stage(project, "prompts", background=True, delays={"pandas:DataFrame.to_parquet": 2.0})
    kill_when(proc, lambda: (out / "pairs.parquet").exists() and (out / ".benign.parquet.tmp").exists())
    assert not (out / "benign.parquet").exists() and not (project / "metrics/prompts.json").exists()

    run_inline(project, "prompts")
    assert file_hashes(project, *PROMPTS_OUT) == file_hashes(tiny_reference, *PROMPTS_OUT)
    assert_clean(project)


def test_prompts_llm_recipe_killed_resumes_from_its_journal(llm_fault_run: LLMRun) -> None:
    run = llm_fault_run  # killed after 20 journaled replies, then `dvc repro prompts` (see conftest)
    assert file_hashes(run.project, *PROMPTS_OUT) == file_hashes(run.ref, *PROMPTS_OUT)
    journal = ".cache/prompts/scripted.jsonl"
    keys = [json.loads(x)["key"] for x in (run.project / journal).read_text().splitlines() if x.strip()]
    ref_keys = [json.loads(x)["key"] for x in (run.ref / journal).read_text().splitlines()]
    assert len(keys) == len(set(keys)) and set(keys) == set(ref_keys), "each reply journaled once"
    assert run.asked_after_kill <= run.asked_ref - 20, "journaled replies were not asked again"
    status = dvc(run.project, "status", "prompts")
    assert "up to date" in status.stdout.lower(), status.stdout
    assert_clean(run.project)


# ------------------------------------------------------------------------------------------------- dvc
def test_dvc_repro_killed_mid_render_then_repro_again(tiny_reference: Path, tmp_path: Path) -> None:
    project = init_dvc(make_project(tmp_path / "p", like=tiny_reference))
    # prompts and base as an earlier `dvc repro` would have left them (their runs are tested elsewhere)
    copy_project(tiny_reference, project, "data/prompts", "metrics/prompts.json", "models/base", "metrics/base.json",
                 "plots/base_samples.png")
    dvc(project, "commit", "-f", "prompts", "base")
    images = project / "data/render/images"
    proc = dvc(project, "repro", "render", background=True, delays={"PIL.Image:Image.save": 0.2})
    kill_when(proc, lambda: killable_mid_batch(images))
    assert len(journal_batches(images)) < 6

    dvc(project, "repro", "render")
    status = dvc(project, "status", "render")
    assert "up to date" in status.stdout.lower(), status.stdout
    assert file_hashes(project, *RENDER_OUT, *PROMPTS_OUT, "models/base/*") == \
        file_hashes(tiny_reference, *RENDER_OUT, *PROMPTS_OUT, "models/base/*")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert {"prompts", "base", "render"} <= set(lock["stages"])
    batches = journal_batches(images)
    assert len(batches) == len(set(batches)) == 6
    assert_clean(project)


def test_resumed_training_restores_the_log_dvc_deleted(reference_copy):
    """DVC removes a stage's outputs (the per-step log) before re-running it; checkpoints survive. The resumed
    run must still end with the whole log, equal to an uninterrupted run's."""
    cat = "violence"
    log = reference_copy / f"metrics/train/{cat}.csv"
    run_inline(reference_copy, "train", "--category", cat)  # leaves checkpoints (train.checkpoint_every 2 of 6)
    full = log.read_text()
    assert sorted((reference_copy / "checkpoints" / cat).glob("step_*")), "the tiny run should leave checkpoints"
    log.unlink()
    (reference_copy / f"models/experts/{cat}.safetensors").unlink()
    run_inline(reference_copy, "train", "--category", cat)
    assert log.read_text() == full


def test_emptied_dvc_lock_is_recovered_from_git_and_the_run_cache(tiny_reference: Path, tmp_path: Path) -> None:
    """DVC writes dvc.lock in place, not atomically: a SIGKILL at the wrong moment leaves it empty (measured), and
    the next `dvc repro` refuses. The documented recovery (docs/guarantees.md): `git checkout dvc.lock`, then
    `dvc repro`, which restores the stages finished since the last commit from DVC's run cache, re-running none."""
    project = init_dvc(make_project(tmp_path / "p", like=tiny_reference))
    copy_project(tiny_reference, project, "data/prompts", "metrics/prompts.json", "models/base", "metrics/base.json",
                 "plots/base_samples.png", "data/render")
    dvc(project, "commit", "-f", "prompts", "base", "render")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "prompts, base, render"], cwd=project, check=True)
    stage = "train@violence"
    ran = dvc(project, "repro", "--single-item", stage)
    assert "train@violence:" in ran.stdout, ran.stdout[-600:]  # the stage itself ran (its own summary line)
    expert = project / "models/experts/violence.safetensors"
    before = file_hashes(project, "models/experts/*", "metrics/train/violence.*")
    (project / "dvc.lock").write_text("")  # what the kill left
    broken = dvc(project, "repro", "--single-item", stage, check=False)
    assert broken.returncode != 0 and "dvc.lock" in broken.stdout + broken.stderr
    subprocess.run(["git", "checkout", "dvc.lock"], cwd=project, check=True)
    expert.unlink()  # even an output lost with it comes back from the cache
    again = dvc(project, "repro", "--single-item", stage)
    out = again.stdout + again.stderr
    assert "train@violence:" not in out and "skipping run" in out.lower(), out[-800:]
    assert file_hashes(project, "models/experts/*", "metrics/train/violence.*") == before
    status = dvc(project, "status", stage)
    assert "up to date" in status.stdout.lower(), status.stdout
