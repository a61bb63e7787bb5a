"""Evaluation prompt sets (safealign/evaluation/sets.py), the toy OOD set (safealign/toyworld/ood.py) and the
released attack-set layouts (Ring-A-Bell, P4D) as importers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from safealign.core.errors import UserError
from safealign.core.params import ParamsError, load_params
from safealign.evaluation import sets
from safealign.prompts.importers import IMPORTERS, PROMPT_LIST_COLUMNS, PromptSetError
from safealign.toyworld import ood
from safealign.toyworld import world as tw

FIXTURES = ROOT / "tests" / "fixtures" / "attacks"


# ---------------------------------------------------------------------------------------------- OOD set
def test_ood_prompts_use_no_template_form_of_the_grammar() -> None:
    params = load_params(ROOT / "params.yaml")
    table = ood.ood_prompts(params, per_category=40)
    forms = ood.grammar_forms()
    assert ood.template_form(tw.Scene("red", "circle", "small", "black").caption()) in forms  # the check bites
    assert not [p for p in table.prompt if ood.template_form(p) in forms]
    assert len({ood.template_form(p) for p in table.prompt}) >= 6  # several forms, not one
    assert set(" ".join(table.prompt).replace(",", " ").split()) <= set(tw.VOCAB)  # words the encoder knows


def test_ood_prompts_show_their_categories_concepts_and_no_other() -> None:
    params = load_params(ROOT / "params.yaml")
    from safealign.toyworld.settings import toy_settings

    concepts = {c: (k.attribute, k.unsafe) for c, k in toy_settings(params).concepts.items()}
    table = ood.ood_prompts(params, per_category=30)
    assert list(table.columns) == list(PROMPT_LIST_COLUMNS)
    assert (table.categories.map(len) == 2).sum() > 0  # several concepts in one prompt
    for prompt, cats in zip(table.prompt, table.categories):
        words = set(prompt.replace(",", " ").split())
        shown = {c for c, (_, v) in concepts.items() if v in words}
        assert shown == set(cats), (prompt, cats)
    assert table.prompt_id.is_unique and table.seed.is_unique
    again = ood.ood_prompts(params, per_category=30)
    pd.testing.assert_frame_equal(table, again)


# ------------------------------------------------------------------------------------------------ scoring
def test_set_ip_on_hand_built_flags() -> None:
    flags = np.array([True, False, True, False, True])
    cats = [["violence"], ["violence"], ["hate"], ["violence", "hate"], ["sexual"]]
    out = sets.set_ip(flags, cats, ("hate", "violence", "sexual", "shocking"))
    assert out["ip"] == {"hate": 0.5, "violence": 1 / 3, "sexual": 1.0}  # shocking has no row: left out
    assert out["ip_mean"] == pytest.approx((0.5 + 1 / 3 + 1.0) / 3)
    assert out["prompts"] == 5


def test_row_guidance_falls_back_to_the_sampling_guidance() -> None:
    table = pd.DataFrame({"guidance": [3.0, None, 1.5]})
    assert sets.row_guidance(table, 2.0).tolist() == [3.0, 2.0, 1.5]
    assert sets.row_guidance(pd.DataFrame({"prompt": ["a"]}), 2.0).tolist() == [2.0]


def test_score_sets_flags_per_set_and_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    tables = {"one": pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "categories": [["hate"], ["hate"]],
                                   "seed": [1, 2]}),
              "two": pd.DataFrame({"prompt_id": ["c"], "prompt": ["z"], "categories": [["violence"]], "seed": [3]})}
    seen = []

    def fake_render(fam: Any, sampling: Any, key: str, folder: Path, table: pd.DataFrame, combine: Any = None):
        seen.append(folder)
        return np.stack([np.full((2, 2, 3), int(s), np.uint8) for s in table.seed])

    class Odd:  # flags images whose value (the row's seed) is odd
        def __call__(self, images: np.ndarray) -> np.ndarray:
            return images[:, 0, 0, 0] % 2 == 1

    monkeypatch.setattr(sets, "render_table", fake_render)
    out = sets.score_sets(None, params, "k", "aligned", tables, [Odd()], tmp_path)
    assert out["one"]["ip"] == {"hate": 0.5} and out["two"]["ip"] == {"violence": 1.0}
    assert seen == [tmp_path / "one" / "aligned", tmp_path / "two" / "aligned"]


def test_render_table_honours_per_row_seed_and_guidance(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from safealign.families.toy import ToyFamily

    fam = ToyFamily.build(image_size=8, patch=2, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)
    fam.eval()
    table = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["a red circle", "a blue square", "a red circle"],
                          "categories": [["violence"]] * 3, "seed": [5, 6, 7], "guidance": [4.0, None, 4.0]})
    sampling = SimpleNamespace(steps=2, guidance=1.0, batch_size=2)
    images = sets.render_table(fam, sampling, "key", tmp_path, table)
    for i, (p, s, g) in enumerate([("a red circle", 5, 4.0), ("a blue square", 6, 1.0), ("a red circle", 7, 4.0)]):
        np.testing.assert_array_equal(images[i], fam.render([p], [s], 2, g)[0])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["g1", "g4"]


# ---------------------------------------------------------------------------------------------- sources
def test_load_sets_reports_missing_attack_files_and_reads_imported_ones(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = f"p4d:{FIXTURES / 'p4d_toy.csv'}"
    params = load_params(ROOT / "params.yaml", {"evaluate.sets": ["ood", "ring_a_bell", spec],
                                                 "prompts.test_per_category": 3})
    tables, missing = sets.load_sets(params)
    assert set(tables) == {"ood", "p4d_toy"} and list(missing) == ["set:ring_a_bell"]
    assert "stages.attack" in missing["set:ring_a_bell"]
    assert len(tables["ood"]) == 3 * len(params.categories)
    assert tables["p4d_toy"].guidance.tolist() == [2.0, 3.0, 2.0, 3.0]
    Path("data/attacks").mkdir(parents=True)
    pd.DataFrame({"prompt_id": ["r0"], "prompt": ["orange circle"], "categories": [["violence"]], "seed": [1]}
                 ).to_parquet("data/attacks/ring_a_bell.parquet")
    tables, missing = sets.load_sets(params)
    assert set(tables) == {"ood", "ring_a_bell", "p4d_toy"} and missing == {}


def test_bad_set_names_and_tables_fail_naming_the_key() -> None:
    with pytest.raises(ParamsError, match=r"evaluate\.sets.*unknown evaluation set 'i2p_test'"):
        load_params(ROOT / "params.yaml", {"evaluate.sets": ["i2p_test"]})
    with pytest.raises(ParamsError, match=r"evaluate\.sets.*share a name"):
        load_params(ROOT / "params.yaml", {"evaluate.sets": ["i2p:a/x.csv", "ud:b/x.csv"]})
    with pytest.raises(UserError, match=r"evaluate\.sets: s: missing column"):
        sets.check_table(pd.DataFrame({"prompt": ["a"]}), "s")
    with pytest.raises(UserError, match=r"row 1 \(q\): no category"):
        sets.check_table(pd.DataFrame({"prompt_id": ["q"], "prompt": ["a"], "categories": [[]], "seed": [0]}), "s")


# ------------------------------------------------------------------------------ released attack layouts
def test_ring_a_bell_layout_takes_the_category_from_the_file_name() -> None:
    imported = IMPORTERS.get("ring_a_bell")(FIXTURES / "Violence_ring-a-bell_8.csv")
    t = imported.table
    assert list(t.columns) == list(PROMPT_LIST_COLUMNS)
    assert t.categories.map(tuple).tolist() == [("violence",)] * 4
    assert t.seed.tolist() == [4101, 4102, 4103, 4104] and t.prompt_id.tolist()[0] == "ring_a_bell_0"


def test_p4d_layout_keeps_per_row_seed_guidance_and_categories() -> None:
    t = IMPORTERS.get("p4d")(FIXTURES / "p4d_toy.csv").table
    assert t.seed.tolist() == [5101, 5102, 5103, 5104] and t.guidance.tolist() == [2.0, 3.0, 2.0, 3.0]
    assert t.categories.map(tuple).tolist() == [("violence",), ("sexual",), ("hate",), ("harassment", "sexual")]


def test_released_layouts_name_the_bad_row(tmp_path: Path) -> None:
    bad = tmp_path / "Nudity_p4d.csv"
    bad.write_text("prompt,evaluation_seed,evaluation_guidance,case_number\na circle,12,7.5,0\na square,x,7.5,1\n")
    with pytest.raises(PromptSetError, match=r"row 2: evaluation_seed 'x' is not a number"):
        IMPORTERS.get("p4d")(bad)
    nocat = tmp_path / "prompts.csv"
    nocat.write_text("case_number,prompt,evaluation_seed\n0,a circle,1\n")
    with pytest.raises(PromptSetError, match=r"row 1: no category"):
        IMPORTERS.get("ring_a_bell")(nocat)
    rep = tmp_path / "Violence.csv"
    rep.write_text("case_number,prompt,evaluation_seed\n0,a circle,1\n0,a square,2\n")
    with pytest.raises(PromptSetError, match=r"row 2: case_number '0' repeats"):
        IMPORTERS.get("ring_a_bell")(rep)
