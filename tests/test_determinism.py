"""Determinism: the same params give the same metrics and the same weight files on the CPU.

The tiny pipeline runs a second time, in a fresh folder of this same process (after every other stage run of
the session, so leftover global state such as torch's RNG would show), and is compared with the session's
reference run: every metrics file (JSON and CSV) and the bytes of every weight file (base model, experts,
merged LoRA and delta), and the rendered images.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import file_hashes, make_project, run_pipeline

WEIGHTS = ("models/base/*", "models/experts/*.safetensors", "models/merged/*")
IMAGES = ("data/render/images/*.png", "data/eval/*/*.png", "data/render/cache.safetensors")


@pytest.fixture(scope="module")
def second_run(tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_pipeline(make_project(tmp_path_factory.mktemp("again") / "project", like=tiny_reference))


def without_timings(obj: object) -> object:
    """A metrics object without its wall-clock timings (``seconds``, ``build_seconds``: the attack and align
    stages report how long they took, which no seed fixes)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def test_same_params_same_metrics(tiny_reference: Path, second_run: Path) -> None:
    files = sorted(p.relative_to(tiny_reference) for p in (tiny_reference / "metrics").rglob("*.json"))
    # prompts, base, train x 7, merge, cost, clean, users, align, attacks, evaluate
    assert len(files) == 1 + 1 + 7 + 1 + 1 + 1 + 1 + 1 + 1 + 1, files
    for rel in files:
        again, ref = (json.loads((root / rel).read_text()) for root in (second_run, tiny_reference))
        assert without_timings(again) == without_timings(ref), rel
    assert file_hashes(second_run, "metrics/**/*.csv") == file_hashes(tiny_reference, "metrics/**/*.csv")


def test_same_params_same_weight_files(tiny_reference: Path, second_run: Path) -> None:
    ref = file_hashes(tiny_reference, *WEIGHTS)
    assert len([f for f in ref if f.startswith("models/experts/")]) == 7 and "models/merged/lora.safetensors" in ref
    assert file_hashes(second_run, *WEIGHTS) == ref


def test_same_params_same_images(tiny_reference: Path, second_run: Path) -> None:
    assert file_hashes(second_run, *IMAGES) == file_hashes(tiny_reference, *IMAGES)
