"""Many processes from params: the train stage through `accelerate launch` (``runtime.launcher``) trains the same
expert, to float tolerance, as one process with the same global batch; render and evaluate through it split the
batches and give byte-identical files; dvc.yaml takes the launcher from params."""
from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import file_hashes, init_dvc, make_project, run_command, run_inline
from safetensors.torch import load_file
from torch.testing import assert_close

pytest.importorskip("accelerate")

# LAUNCH: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15's simple launcher; CPU
# multi-process through it needs MPI). `--multi_gpu --num_processes 2` starts two through torch.distributed.run,
# and the Accelerator of a CPU run (runtime.device cpu) then joins them with gloo (MULTI_CPU).


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy project with prompts, base and render done (what the train stage reads)."""
    # lr pinned: Adam moves an entry whose gradient is near zero by up to lr a step in either direction, so the
    # float tolerance below scales with it (at the default's 0.04 one entry of 64 differed by 1.6e-4)
    project = make_project(tmp_path_factory.mktemp("accel") / "project",
                           {"categories": ["hate", "violence"], "train.batch_size": 4, "train.anchor_batch_size": 4,
                            "train.lr": 0.015})
    for stage in ("prompts", "base", "render"):
        run_inline(project, stage)
    return project


def test_two_processes_train_the_same_expert_as_one(rendered: Path) -> None:
    run_inline(rendered, "train", "--category", "hate")
    one = load_file(rendered / "models/experts/hate.safetensors")
    log_one = (rendered / "metrics/train/hate.csv").read_text()
    shutil.rmtree(rendered / "checkpoints")  # else the second run would resume from the first one's checkpoints
    (rendered / "metrics/train/hate.csv").unlink()
    (rendered / "models/experts/hate.safetensors").unlink()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "stages.train", "--category", "hate"]
    done = run_command(rendered, launch, timeout=600)
    assert "2 process(es)" in done.stdout  # two processes did train (see LAUNCH)
    two = load_file(rendered / "models/experts/hate.safetensors")
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        assert_close(two[k], one[k], atol=1e-4, rtol=1e-3)  # 6 AdamW steps: sums in another order, measured 1.3e-5
    assert any((v.abs() > 0).any() for k, v in one.items() if "lora_B" in k)  # it trained: B moved off zero
    rows_one = [line.split(",") for line in log_one.splitlines()[1:]]
    rows_two = [line.split(",") for line in (rendered / "metrics/train/hate.csv").read_text().splitlines()[1:]]
    assert len(rows_one) == len(rows_two) == 6
    for a, b in zip(rows_one, rows_two, strict=True):  # the logged loss is the whole batch's in both
        assert abs(float(a[1]) - float(b[1])) <= 1e-4 * max(1.0, abs(float(a[1])))


def test_a_batch_that_does_not_split_evenly_is_refused(rendered: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", like=rendered, overrides={"train.batch_size": 3})
    for part in ("data", "models"):
        shutil.copytree(rendered / part, project / part, dirs_exist_ok=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "stages.train", "--category", "hate"]
    done = run_command(project, launch, check=False, timeout=600)
    assert done.returncode != 0
    assert "error: train.batch_size=3: not a multiple of the 2 training processes" in done.stderr


def test_dvc_takes_the_train_launcher_from_params(tmp_path: Path) -> None:
    project = init_dvc(make_project(tmp_path / "project"), git=False)
    def cmds() -> set[str]:  # the train stages' commands as DVC resolves dvc.yaml against params.yaml
        from dvc.repo import Repo

        with Repo(str(project)) as repo:
            return {f"> {st.cmd}" for st in repo.index.stages if st.name in ("train@hate", "train_all")}
    assert cmds() == {"> python -m stages.train --category hate", "> python -m stages.train --category all"}
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["runtime"]["launcher"] = "accelerate launch --num_processes 8"
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cmds() == {"> accelerate launch --num_processes 8 -m stages.train --category hate",
                      "> accelerate launch --num_processes 8 -m stages.train --category all"}


def launch_two(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def test_two_processes_evaluate_the_same_files_as_one(reference_copy: Path, tiny_reference: Path) -> None:
    """`evaluate` through the launcher (its renders go through render_to_folder, as `render`'s do): each process
    renders every second batch of every image set, the main process writes; the images and every evaluation
    metric equal the one-process run's, byte for byte. (One stage only: each launch costs four processes' imports.)"""
    shutil.rmtree(reference_copy / "data/eval")
    (reference_copy / "metrics/evaluate.json").unlink()
    done = run_command(reference_copy, launch_two("-m", "stages.evaluate"), timeout=900)
    assert "2 process(es)" in done.stdout, done.stdout[-500:]
    ours, ref = file_hashes(reference_copy, "data/eval/**/*.png"), file_hashes(tiny_reference, "data/eval/**/*.png")
    assert len(ref) > 50 and ours == ref
    evaluate = [json.loads((p / "metrics/evaluate.json").read_text()) for p in (reference_copy, tiny_reference)]
    assert evaluate[0] == evaluate[1]


def test_sharded_render_splits_the_batches_and_resumes_with_any_process_count(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks (threads standing in for processes, one barrier) render disjoint batches whose union is one
    process's output; a one-process run afterwards renders nothing (the batch keys carry no process count)."""
    from safealign.families import rendering
    from safealign.families.toy import ToyFamily

    fam = ToyFamily.build(image_size=8, patch=2, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)
    fam.eval()
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "pink", "gray", "cyan", "white")]
    seeds, names = list(range(7)), [f"r{i}" for i in range(7)]
    one = rendering.render_to_folder(fam, prompts, seeds, names, tmp_path / "one", 2, 2.0, 2, "k")
    local, barrier = threading.local(), threading.Barrier(2)
    monkeypatch.setattr(rendering, "process_shard", lambda device: (local.rank, 2, barrier.wait))
    rendered: dict[int, list[str]] = {0: [], 1: []}
    real = fam.render

    def spy(batch: list[str], *a: Any, **k: Any) -> Any:
        rendered[local.rank] += batch
        return real(batch, *a, **k)

    monkeypatch.setattr(fam, "render", spy)
    out: dict[int, Any] = {}

    def rank(r: int) -> None:
        local.rank = r
        out[r] = rendering.render_to_folder(fam, prompts, seeds, names, tmp_path / "two", 2, 2.0, 2, "k")

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert rendered == {0: prompts[0:2] + prompts[4:6], 1: prompts[2:4] + prompts[6:7]}  # batches 0, 2 and 1, 3
    assert (out[0] == one).all() and (out[1] == one).all()
    lines = (tmp_path / "two" / rendering.JOURNAL).read_text().splitlines()
    assert len(lines) == 1 + 4  # the header, then one line per batch from whichever process rendered it
    monkeypatch.setattr(rendering, "process_shard", lambda device: (0, 1, lambda: None))
    rendered[0].clear()
    local.rank = 0
    again = rendering.render_to_folder(fam, prompts, seeds, names, tmp_path / "two", 2, 2.0, 2, "k")
    assert rendered[0] == [] and (again == one).all()
