"""params.yaml validation: every error names its key and what is allowed."""
from pathlib import Path

import pytest
from conftest import read_yaml

from safealign.core.params import ParamsError, load_params, parse_overrides, validate

ROOT = Path(__file__).resolve().parents[1]

def raw():
    return read_yaml((ROOT / "params.yaml").read_text())  # YAML 1.2, as `dvc exp run -S` writes it

def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.model.family == "toy" and set(p.toy.concepts) == set(p.categories)
    with pytest.raises(Exception):
        p.train.beta = 1.0  # frozen

@pytest.mark.parametrize("key, value, expected", [
    ("train.beta", 0, "train.beta"),
    ("train.beta", "high", "train.beta"),
    ("train.bogus", 1, "train.bogus: unknown key"),
    ("merge.method", "average", "merge.method: unknown merge rule 'average'; allowed:"),
    ("merge.method", "average", "max_abs, single, task_arithmetic"),
    ("train.anchor_weight", -1, "train.anchor_weight"),
    ("prompts.backend", "gpt", "prompts.backend: unknown prompt backend 'gpt'; allowed:"),
    ("model.family", "sd9", "model.family: unknown model family 'sd9'; allowed:"),
    ("train.loss", "kto", "train.loss: unknown loss 'kto'; allowed: dpo"),
    ("evaluate.detectors", ["toy", "magic"], "evaluate.detectors: unknown detector 'magic'"),
    ("categories", ["hate", "spam"], "categories: unknown category 'spam'"),
    ("model.dtype", "float8", "model.dtype"),
])
def test_bad_value_names_its_key(key, value, expected):
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", {key: value})
    assert expected in str(e.value)
    assert "params.yaml" in str(e.value)

def test_concept_with_unknown_colour_names_the_category_and_allowed_values():
    r = raw()
    r["toy"]["concepts"]["violence"]["unsafe"] = "crimson"
    with pytest.raises(ParamsError) as e:
        validate(r)
    msg = str(e.value)
    assert "toy.concepts.violence" in msg and "'crimson' is not a toy color" in msg and "red" in msg

def test_concept_with_unknown_shape():
    r = raw()
    r["toy"]["concepts"]["self_harm"] = {"attribute": "shape", "unsafe": "hexagon", "safe": "circle"}
    with pytest.raises(ParamsError, match="toy.concepts.self_harm.*hexagon"):
        validate(r)

def test_safe_twin_that_is_itself_unsafe_is_refused():
    r = raw()
    r["toy"]["concepts"]["violence"]["safe"] = "pink"  # pink plays 'sexual'
    with pytest.raises(ParamsError, match="toy.concepts.violence.safe"):
        validate(r)

def test_category_without_concept_is_refused():
    r = raw()
    del r["toy"]["concepts"]["hate"]
    with pytest.raises(ParamsError, match="no concept for category 'hate'"):
        validate(r)

def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)

def test_unquoted_no_as_dvc_exp_run_writes_it_stays_a_string(tmp_path):
    """`dvc exp run -S ...` rewrites params.yaml and drops the quotes of "no"; YAML 1.1 would read False."""
    text = (ROOT / "params.yaml").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no" in text
    (tmp_path / "params.yaml").write_text(text)
    p = load_params(tmp_path / "params.yaml")
    assert p.train.mixed_precision == "no" and p.evaluate.blur_unsafe is True


def test_command_line_overrides_read_as_params_yaml_reads_them():
    """`--set` / `-S` of the validation tools: YAML 1.2 values under dotted keys; `no` stays text."""
    got = parse_overrides(["merge.scale=0.5", "train.mixed_precision=no", "psa.teacher=experts", "x.y=[1, 2]",
                           " sampling.steps =8", "evaluate.blur_unsafe=false"])
    assert got == {"merge.scale": 0.5, "train.mixed_precision": "no", "psa.teacher": "experts", "x.y": [1, 2],
                   "sampling.steps": 8, "evaluate.blur_unsafe": False}
    with pytest.raises(ParamsError, match=r"-S 'merge.scale': not key=value"):
        parse_overrides(["merge.scale"], "-S")
    with pytest.raises(ParamsError, match="not key=value"):
        parse_overrides(["=3"])
