"""The whole toy pipeline at tiny size: every stage runs, writes what dvc.yaml declares, and each merge rule
(plus `single`) produces a LoRA the family loads."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, copy_project, make_project, read_yaml, run_inline, set_dotted

from safealign.families.lora import read_lora

METRIC_KEYS = {"ip", "ip_mean", "fidelity", "twin_rate"}


def test_outputs_and_metrics_contract(tiny_reference: Path):
    base = json.loads((tiny_reference / "metrics/base.json").read_text())
    cats = read_yaml((tiny_reference / "params.yaml").read_text())["categories"]
    assert set(base["accuracy"]) == {"color", "shape", "size", "background"}
    assert set(base["concept_rate"]) == set(cats) == set(base["false_positive_rate"])
    ev = json.loads((tiny_reference / "metrics/evaluate.json").read_text())
    for model in ("base", "aligned"):
        assert METRIC_KEYS <= set(ev[model]) and set(ev[model]["ip"]) == set(cats)
        assert 0 <= ev[model]["ip_mean"] <= 1
    assert ev["protocol"]["detectors"][0]["detector"] == "toy"
    for f in ("plots/ip_by_category.png", "plots/eval_grid.png", "plots/base_samples.png",
              "models/merged/lora.safetensors", "models/merged/delta.safetensors", "data/render/cache.safetensors"):
        assert (tiny_reference / f).stat().st_size > 0, f
    pairs = pd.read_parquet(tiny_reference / "data/prompts/pairs.parquet")
    manifest = pd.read_parquet(tiny_reference / "data/render/manifest.parquet")
    assert set(manifest.pair_id) == set(pairs.pair_id[pairs.split == "train"])
    for cat in cats:
        log = pd.read_csv(tiny_reference / f"metrics/train/{cat}.csv")
        assert list(log.step) == list(range(1, len(log) + 1))


def test_dvc_yaml_names_every_stage_module_and_expert():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2].replace(".", "/") + ".py"
        assert module in body["deps"], f"{name}: {module} missing from deps"
    params = read_yaml((ROOT / "params.yaml").read_text())
    merge_deps = spec["merge"]["deps"]
    for cat in params["categories"] + ["all"]:
        assert f"models/experts/{cat}.safetensors" in merge_deps


@pytest.mark.parametrize("method", ["co_merge", "max_abs", "linear", "task_arithmetic", "ties", "dare", "single"])
def test_every_merge_rule_runs(reference_copy: Path, method: str):
    raw = read_yaml((reference_copy / "params.yaml").read_text())
    set_dotted(raw, "merge.method", method)
    (reference_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    if method == "single" and not (reference_copy / "models/experts/all.safetensors").exists():
        run_inline(reference_copy, "train", "--category", "all")
    run_inline(reference_copy, "merge")
    state, meta = read_lora(reference_copy / "models/merged/lora.safetensors")
    assert meta["method"] == method and int(meta["rank"]) == raw["merge"]["rank"]
    merged = json.loads((reference_copy / "metrics/merge.json").read_text())
    assert merged["method"] == method and 0 <= merged["svd_rel_error"]["max"] <= 1


def test_evaluate_with_real_detectors_reports_missing_weights(reference_copy: Path):
    """NudeNet runs on the rendered toy images; Q16, FID and CLIPScore have no weights here and are reported as
    missing with the reason, never as numbers."""
    pytest.importorskip("nudenet")
    raw = read_yaml((reference_copy / "params.yaml").read_text())
    set_dotted(raw, "evaluate.detectors", ["toy", "nudenet", "q16"])
    set_dotted(raw, "evaluate.quality", ["toy_fd", "fid", "clipscore"])
    (reference_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    run_inline(reference_copy, "evaluate")
    ev = json.loads((reference_copy / "metrics/evaluate.json").read_text())
    assert {"q16", "fid", "clipscore"} <= set(ev["missing"])
    assert all(isinstance(r, str) and r for r in ev["missing"].values())
    assert [d["detector"] for d in ev["protocol"]["detectors"]][:1] == ["toy"]
    assert any("nudenet" in json.dumps(d).lower() for d in ev["protocol"]["detectors"])
    for model in ("base", "aligned"):
        assert "fid" not in ev[model] and "clipscore" not in ev[model]
        assert isinstance(ev[model]["toy_fd"], float)


def test_pipeline_runs_on_llm_written_pairs(llm_fault_run, tmp_path: Path):
    """The pairs the LLM recipe wrote (openai backend, fake local server) feed every later stage: render,
    seven experts, merge, align and evaluate run on them and report IP for every category."""
    ref = llm_fault_run.ref
    project = make_project(tmp_path / "llm", like=ref)
    copy_project(ref, project, "data/prompts", "metrics/prompts.json")
    pairs = pd.read_parquet(project / "data/prompts/pairs.parquet")
    cats = read_yaml((project / "params.yaml").read_text())["categories"]
    assert {c for cs in pairs.categories for c in cs} == set(cats)
    for name in ("base", "render", "users"):  # users: every method's per-user metrics in evaluate
        run_inline(project, name)
    for cat in cats:
        run_inline(project, "train", "--category", cat)
    for name in ("merge", "align", "evaluate"):
        run_inline(project, name)
    ev = json.loads((project / "metrics/evaluate.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert set(ev["aligned"]["ip"]) == set(cats)
    # LLM benign prompts name no toy attribute: the toy fidelity has nothing to measure, and says so with null
    assert ev["aligned"]["fidelity"] is None
    assert ev["protocol"]["test_prompts"] == int((pairs.split == "test").sum())
    manifest = pd.read_parquet(project / "data/render/manifest.parquet")
    assert list(manifest.unsafe_prompt) == list(pairs.unsafe_prompt[pairs.split == "train"])


def test_train_all_writes_a_marker_unless_something_reads_it(reference_copy: Path):
    """train_all trains only for merge.method single (or attack.target expert:all); otherwise it writes an untrained
    marker that safetensors reads and read_lora refuses with the reason, and a metrics file saying so."""
    from safetensors import safe_open

    from safealign.core.params import load_params
    from safealign.training.unused import all_single_unused

    params = load_params(reference_copy / "params.yaml")
    assert params.merge.method != "single" and "merge.method" in all_single_unused(params)
    assert all_single_unused(params.model_copy(update={"merge": params.merge.model_copy(update={"method": "single"})})) is None
    target = params.model_copy(update={"attack": params.attack.model_copy(update={"target": "expert:all"})})
    assert all_single_unused(target) is None
    run_inline(reference_copy, "train", "--category", "all")
    path = reference_copy / "models/experts/all.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == [] and "merge.method" in f.metadata()["not_trained"]
    with pytest.raises(ValueError, match="all.safetensors: this expert was not trained"):
        read_lora(path)
    info = json.loads((reference_copy / "metrics/train/all.json").read_text())
    assert info["trained"] is False and (reference_copy / "metrics/train/all.csv").read_text() == "step,loss\n"
    raw = read_yaml((reference_copy / "params.yaml").read_text())
    set_dotted(raw, "merge.method", "single")
    (reference_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    run_inline(reference_copy, "train", "--category", "all")
    state, meta = read_lora(path)
    assert state and meta["category"] == "all"
    assert "trained" not in json.loads((reference_copy / "metrics/train/all.json").read_text())
