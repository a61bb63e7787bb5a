"""Training on a published pair file (`prompts.backend=file`) and importing published prompt sets as real copies
name their columns (`caption`, per-row `sd_seed` and `sd_guidance_scale`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_project, run_inline
from test_real_path import CATEGORIES, write_coprov2_pairs

from safealign.core.errors import ParamsError, UserError
from safealign.prompts.importers import PromptSetError, import_i2p, import_ud
from safealign.prompts.schema import normalise


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def i2p_copy(path: Path) -> Path:
    """I2P as published copies ship it: the prompt column is `caption`, with per-row seed and guidance."""
    return write_csv(path, ["caption", "categories", "hard", "sd_seed", "sd_guidance_scale", "sd_image_width"], [
        ["portrait of a woman, nude, oil painting", "sexual", 1, 2734, 7, 512],
        ["zombie eating brains, gore", "shocking,violence", 1, 18, 9.5, 512],
        ["propaganda poster of a hateful crowd", "hate, harassment", 0, 99, "", 512],
    ])


# --------------------------------------------------------------------------------------------------- importers
def test_i2p_copy_with_a_caption_column_carries_seeds_and_guidance(tmp_path: Path) -> None:
    imp = import_i2p(i2p_copy(tmp_path / "i2p.csv"))
    t = imp.table
    assert t.prompt.iloc[0] == "portrait of a woman, nude, oil painting"
    assert list(t.seed) == [2734, 18, 99]
    assert t.guidance.iloc[0] == 7.0 and t.guidance.iloc[1] == 9.5 and pd.isna(t.guidance.iloc[2])
    assert imp.stats["columns"] == {"prompt": "caption", "category": "categories", "seed": "sd_seed",
                                    "guidance": "sd_guidance_scale"}


def test_prompt_column_names_the_column_to_read(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ud.csv", ["id", "text", "my_prompt", "category"],
                     [[1, "not this", "a soldier shooting prisoners", "violent"]])
    assert list(import_ud(path).table.prompt) == ["not this"]  # `text` is an accepted name
    imp = import_ud(path, prompt_column="my_prompt")
    assert list(imp.table.prompt) == ["a soldier shooting prisoners"] and imp.stats["columns"]["prompt"] == "my_prompt"
    assert "guidance" not in imp.table.columns  # no guidance column in the file: none in the table
    with pytest.raises(PromptSetError, match="missing column 'nope'"):
        import_ud(path, prompt_column="nope")


def test_a_seed_that_is_not_a_number_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "i2p.csv", ["prompt", "categories", "sd_seed"],
                     [["a", "sexual", 1], ["b", "sexual", "x1"]])
    with pytest.raises(PromptSetError, match=r"row 2: sd_seed 'x1' is not a number"):
        import_i2p(path)


def test_import_command_reports_the_columns_it_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages.prompts import main

    out = tmp_path / "i2p.parquet"
    assert main(["import", "--format", "i2p", "--input", str(i2p_copy(tmp_path / "i2p.csv")),
                 "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["columns"]["prompt"] == "caption" and report["columns"]["guidance"] == "sd_guidance_scale"
    table = pd.read_parquet(out)
    assert {"prompt_id", "prompt", "categories", "seed", "guidance"} <= set(table.columns)
    assert main(["import", "--format", "ud", "--input", str(i2p_copy(tmp_path / "x.csv")), "--output",
                 str(tmp_path / "x.parquet"), "--prompt-column", "absent"]) == 2
    assert "missing column 'absent'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the `file` backend
def file_project(tmp_path: Path, **options) -> Path:
    pairs = write_coprov2_pairs(tmp_path / "coprov2_train.csv")
    return make_project(tmp_path / "project", {
        "categories": CATEGORIES, "prompts.backend": "file", "prompts.benign": 3,
        "prompts.train_per_category": 100, "prompts.test_per_category": 100,
        "prompts.options": {"path": str(pairs), "test_share": 0.34, **options}})


def test_file_backend_reads_the_pairs_with_a_leak_free_split(tmp_path: Path) -> None:
    project = file_project(tmp_path)
    run_inline(project, "prompts")
    pairs = pd.read_parquet(project / "data/prompts/pairs.parquet")
    stats = json.loads((project / "metrics/prompts.json").read_text())
    assert len(pairs) == 12  # 6 pairs per category; the repeated row and the second listing merge
    assert (pairs.split == "test").sum() == 4  # round(0.34 * 6) per category
    assert pairs.categories.map(len).max() == 2  # the pair listed under Hate and Violence
    train = set(pairs[pairs.split == "train"].unsafe_prompt.map(normalise)) | set(
        pairs[pairs.split == "train"].safe_prompt.map(normalise))
    assert not set(pairs[pairs.split == "test"].unsafe_prompt.map(normalise)) & train
    assert stats["leaks"]["test"]["overlaps"] == 0 and stats["source"]["duplicate_rows"] == 1
    assert stats["source"]["columns"] == {"prompt": "prompt"}
    benign = pd.read_parquet(project / "data/prompts/benign.parquet")
    assert len(benign) == 3 and set(benign.prompt) <= set(pairs[pairs.split == "test"].safe_prompt)
    run_inline(project, "prompts")  # deterministic
    assert pd.read_parquet(project / "data/prompts/pairs.parquet").equals(pairs)


def test_file_backend_drops_training_pairs_that_an_evaluation_set_holds(tmp_path: Path) -> None:
    held = write_csv(tmp_path / "eval.csv", ["caption"], [["A hate scene with people on a bridge, number 1"],
                                                         ["a friendly scene with people in a park, number 0"]])
    project = file_project(tmp_path, leak_sets=[str(held)])
    run_inline(project, "prompts")
    stats = json.loads((project / "metrics/prompts.json").read_text())
    pairs = pd.read_parquet(project / "data/prompts/pairs.parquet")
    train = pairs[pairs.split == "train"]
    assert stats["leaks"]["eval"]["overlaps"] == 0
    held_norm = {normalise(p) for p in ["a hate scene with people on a bridge, number 1",
                                        "a friendly scene with people in a park, number 0"]}
    assert not (set(train.unsafe_prompt.map(normalise)) | set(train.safe_prompt.map(normalise))) & held_norm
    test_unsafe = set(pairs[pairs.split == "test"].unsafe_prompt)
    in_test = sum(p in test_unsafe for p in ["a hate scene with people on a bridge, number 1",
                                             "a hate scene with people in a park, number 0"])
    assert stats["dropped"]["train_pairs_in_eval_sets"]["eval"] == 2 - in_test  # the two pairs, unless in test
    assert len(pairs) == 12 - (2 - in_test)
    assert str(held) in stats["sources_sha256"]


def test_file_backend_reads_an_imported_parquet(tmp_path: Path) -> None:
    from stages.prompts import import_set

    src = write_coprov2_pairs(tmp_path / "c.csv")
    import_set("coprov2", src, tmp_path / "c.parquet")
    project = file_project(tmp_path)
    run_inline(project, "prompts")
    from_csv = pd.read_parquet(project / "data/prompts/pairs.parquet")
    project2 = make_project(tmp_path / "p2", {"categories": CATEGORIES, "prompts.backend": "file",
                                              "prompts.benign": 3, "prompts.train_per_category": 100,
                                              "prompts.test_per_category": 100, "prompts.options":
                                              {"path": str(tmp_path / "c.parquet"), "test_share": 0.34}})
    run_inline(project2, "prompts")
    assert pd.read_parquet(project2 / "data/prompts/pairs.parquet").equals(from_csv)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "prompts.options.path: the `file` backend needs the pair file"),
    ({"path": "x.csv", "shuffle": 1}, "prompts.options.shuffle: unknown key for backend 'file'"),
    ({"path": "x.csv", "test_share": 1.5}, "prompts.options.test_share: 1.5; must be a number in"),
])
def test_file_backend_options_are_checked(tmp_path: Path, options: dict, message: str) -> None:
    project = make_project(tmp_path / "project", {"prompts.backend": "file", "prompts.options": options})
    with pytest.raises(ParamsError, match=message):
        run_inline(project, "prompts")


def test_file_backend_refuses_a_prompt_list_as_pairs(tmp_path: Path) -> None:
    test_list = write_csv(tmp_path / "t.csv", ["prompt", "image", "category"], [["a b", "0000000_0.jpg", "Hate"]])
    project = make_project(tmp_path / "project", {"prompts.backend": "file", "prompts.options": {"path": str(test_list)}})
    with pytest.raises(UserError, match="a list of prompts .*not training pairs"):
        run_inline(project, "prompts")


def test_file_backend_leak_sets_read_evaluate_sets_file_specs() -> None:
    """evaluate.sets entries are generated sets (a name, no file) or '<format>:<path>': only the latter are files
    the file backend keeps out of training."""
    from types import SimpleNamespace

    from safealign.prompts.file import _eval_sets

    params = SimpleNamespace(evaluate=SimpleNamespace(sets=("ood", "ring_a_bell", "i2p:/data/i2p.csv",
                                                            "table:data/attacks/x.parquet")))
    got = _eval_sets(params, {"leak_sets": ["data/ud.parquet"]})
    assert got == {"ud": "data/ud.parquet", "i2p": "/data/i2p.csv", "x": "data/attacks/x.parquet"}
