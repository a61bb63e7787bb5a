"""SC-DPO's clean-prompt pairs and experts mode (safealign/sc_dpo/clean.py, method.py): the pair rule, the mixing
share and the per-image match score on hand-computed values; clean prompts that are never evaluation prompts;
and on the tiny project the `clean` stage, a clean share in training, the experts mode that reduces exactly to
the SafetyDPO pipeline (experts + Co-Merge) at lambda = gamma = share = 0, and a clean set that cannot be built."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_inline, run_stage

from safealign.core.errors import UserError
from safealign.evaluation.metrics import match_share
from safealign.sc_dpo.clean import mix_count, mix_rows, preference_pairs
from safealign.training.data import PairData, concat_pairs


def test_preference_pairs_drop_ties_and_prefer_the_higher_score() -> None:
    kept, a_wins = preference_pairs(np.array([1.0, 0.5, 0.5, np.nan, 0.75]), np.array([0.5, 1.0, 0.5, 1.0, 0.25]))
    assert kept.tolist() == [True, True, False, False, True]
    assert a_wins.tolist() == [True, False, False, False, True]


def test_mix_count_and_rows() -> None:
    assert mix_count(672, 0.25) == 224  # 224 / (672 + 224) = 0.25
    assert mix_count(30, 0.5) == 30 and mix_count(10, 0.0) == 0
    with pytest.raises(ValueError):
        mix_count(10, 1.0)
    rows = mix_rows(30, 4, 0.25, seed=3)  # 10 clean rows from 4 pairs: each once before any repeats
    assert len(rows) == 10 and sorted(rows[:4].tolist()) == [0, 1, 2, 3] and sorted(rows[4:8].tolist()) == [0, 1, 2, 3]
    assert len(mix_rows(30, 0, 0.0, seed=3)) == 0
    with pytest.raises(UserError, match="clean_share"):
        mix_rows(30, 0, 0.25, seed=3)


def test_match_share_by_hand() -> None:
    detected = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "circle"}, {"color": "red"}]
    expected = [{"color": "red", "shape": "square"}, {"color": "blue", "shape": "circle"}, {}]
    got = match_share(detected, expected)
    assert got[:2].tolist() == [0.5, 1.0] and np.isnan(got[2])


def test_concat_pairs_keeps_costs_only_when_both_have_them() -> None:
    a = PairData(torch.zeros(2, 1), torch.ones(2, 1), {"t": torch.zeros(2, 3)}, torch.tensor([0.1, 0.2]),
                 torch.tensor([0.9, 0.8]))
    b = PairData(torch.ones(1, 1), torch.zeros(1, 1), {"t": torch.ones(1, 3)}, torch.tensor([0.0]), torch.tensor([0.1]))
    c = concat_pairs(a, b)
    assert len(c) == 3 and c.cost_w.tolist() == pytest.approx([0.1, 0.2, 0.0]) and c.cond["t"][2].sum() == 3
    assert concat_pairs(a, PairData(b.x0_w, b.x0_l, b.cond)).cost_w is None
    with pytest.raises(ValueError, match="conditions differ"):
        concat_pairs(a, PairData(b.x0_w, b.x0_l, {"u": b.cond["t"]}))


def test_the_clean_set_is_needed_only_by_sc_dpo_with_a_clean_share() -> None:
    from safealign.core.params import load_params
    from safealign.sc_dpo import clean_unused

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with_method = lambda m, share: params.model_copy(update={"method": m, "sc_dpo": params.sc_dpo.model_copy(
        update={"clean_share": share})})
    assert clean_unused(with_method("sc_dpo", 0.25)) is None
    for method, share in (("safetydpo", 0.25), ("psa", 0.25), ("sc_dpo", 0.0)):
        assert "only method sc_dpo" in clean_unused(with_method(method, share)), (method, share)


def test_grammar_clean_prompts_are_benign_training_forms_never_evaluation_prompts() -> None:
    from safealign.core.params import load_params
    from safealign.prompts.schema import normalise
    from safealign.toyworld import world as tw
    from safealign.toyworld.grammar import clean_prompts, grammar_backend
    from safealign.toyworld.settings import toy_settings

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    clean = clean_prompts(params)
    sets = grammar_backend(params)
    test = sets.pairs[sets.pairs.split == "test"]
    evaluation = {normalise(p) for p in [*test.unsafe_prompt, *test.safe_prompt, *sets.benign.prompt]}
    assert len(clean) == params.sc_dpo.clean_prompts and not {normalise(p) for p in clean} & evaluation
    concepts = toy_settings(params).concepts.values()
    for p in clean:
        named = tw.parse_caption(p)
        assert not any(named.get(k.attribute) == k.unsafe for k in concepts), p


def _params(project: Path, **updates: object) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in updates.items():
        section, leaf = key.split(".") if "." in key else (None, key)
        (raw[section] if section else raw)[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_clean_stage_clean_share_and_experts_mode_on_the_tiny_project(tiny_reference: Path, tmp_path: Path) -> None:
    """On a copy of the tiny reference run: the clean stage's pairs prefer the better-matching image; method
    sc_dpo with a clean share trains on harmful + clean pairs; experts mode at lambda = gamma = share = 0 gives
    exactly the merge stage's Co-Merge LoRA of the SafetyDPO experts (same seeds, data, rule and code)."""
    import shutil

    from safetensors.torch import load_file

    project = tmp_path / "p"
    shutil.copytree(tiny_reference, project, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    unused = json.loads((project / "metrics/clean.json").read_text())  # the reference runs method safetydpo
    assert unused["pairs"] == 0 and "only method sc_dpo" in unused["unused"], unused
    assert not (project / "data/clean/images").exists()  # nothing rendered

    _params(project, **{"method": "sc_dpo", "sc_dpo.clean_share": 0.5})
    proc = run_stage(project, "align", check=False)  # the set not yet built under these params: a clear refusal
    assert proc.returncode == 2 and "not built" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]
    run_inline(project, "clean")
    clean = json.loads((project / "metrics/clean.json").read_text())
    manifest = __import__("pandas").read_parquet(project / "data/clean/manifest.parquet")
    assert clean["prompts"] == 12 and clean["pairs"] == len(manifest) and clean["pairs"] + clean["ties"] == 12
    assert (manifest.score_w > manifest.score_l).all() and (manifest.seed_w != manifest.seed_l).all()
    if clean["pairs"] == 0:
        pytest.skip("the tiny base model rendered every clean prompt's two images equally well")
    run_inline(project, "align")
    info = json.loads((project / "metrics/align.json").read_text())
    assert info["clean_pairs"] == {"all": info["pairs"]} and info["mode"] == "single"  # share 0.5: as many clean

    _params(project, **{"sc_dpo.mode": "experts", "sc_dpo.cost_lambda": 0.0, "sc_dpo.gamma": 0.0,
                        "sc_dpo.clean_share": 0.0})
    run_inline(project, "align")
    ours = load_file(str(project / "models/aligned/lora.safetensors"))
    merged = load_file(str(project / "models/merged/lora.safetensors"))
    assert ours.keys() == merged.keys() and all(torch.allclose(ours[k], merged[k], atol=1e-6) for k in ours)
    cats = yaml.safe_load((project / "params.yaml").read_text())["categories"]
    for c in cats:
        expert = load_file(str(project / f"models/experts/{c}.safetensors"))
        again = load_file(str(project / f"models/aligned/experts/{c}.safetensors"))
        assert all(torch.equal(expert[k], again[k]) for k in expert), c


def test_a_clean_set_that_cannot_be_built_is_reported_and_sc_dpo_refuses(tiny_reference: Path, tmp_path: Path) -> None:
    import shutil

    project = tmp_path / "p"
    shutil.copytree(tiny_reference, project, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    _params(project, **{"method": "sc_dpo", "sc_dpo.clean_share": 0.25, "sc_dpo.clean_source": "file",
                        "sc_dpo.clean_path": "nowhere.csv"})
    run_inline(project, "clean")
    info = json.loads((project / "metrics/clean.json").read_text())
    assert info["pairs"] == 0 and "sc_dpo.clean_path" in info["unavailable"]
    _params(project, **{"method": "sc_dpo", "sc_dpo.clean_share": 0.25})
    proc = run_stage(project, "align", check=False)
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode == 2 and "clean_share" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-800:]
