"""The rails every method runs on: lazy registries, params validation that imports no implementation, settings
validated by the part that owns them, the extension points (per-pair loss record, weighted terms, extra
cross-attention conditioning, guidance rules, the method registry), and params keys covered by dvc.yaml."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, make_project, read_yaml, run_inline
from torch.testing import assert_close

from safealign.core.errors import ParamsError
from safealign.core.params import validate
from safealign.core.registry import Registry

HEAVY = ("torch", "diffusers", "transformers", "peft", "openai", "sentence_transformers", "onnxruntime", "nudenet",
         "scipy", "safealign.families.base", "safealign.families.toy", "safealign.families.sd",
         "safealign.prompts.llm", "safealign.prompts.recipe", "safealign.toyworld.grammar", "safealign.toyworld.detect",
         "safealign.toyworld.judge", "safealign.evaluation.detectors_real", "safealign.evaluation.quality_real",
         "safealign.training.losses", "safealign.merging.rules", "safealign.safetydpo.method")


def test_validating_params_imports_no_family_llm_or_detector() -> None:
    code = ("import sys, json; from safealign.core.params import load_params; p = load_params('params.yaml'); "
            "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"validating params imported {heavy}"
    assert "safealign.toyworld.settings" in loaded  # the toy family's own section was validated, by its owner


def test_lazy_registry_imports_on_get_and_names_the_allowed() -> None:
    reg: Registry[Any] = Registry("widget")
    reg.add_lazy("json_dumps", "json:dumps")
    reg.add("plain", len)
    assert list(reg) == ["json_dumps", "plain"] and "json_dumps" in reg
    assert reg.check("plain") == "plain"
    assert reg.get("json_dumps") is json.dumps
    with pytest.raises(KeyError, match="unknown widget 'nope'; allowed: json_dumps, plain"):
        reg.get("nope")
    with pytest.raises(ValueError, match="unknown widget 'nope'"):
        reg.check("nope")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add_lazy("plain", "json:loads")
    with pytest.raises(ValueError, match="package.module:attribute"):
        reg.add_lazy("bad", "json")


def test_every_lazy_entry_resolves() -> None:
    from safealign.evaluation import DETECTORS, QUALITY
    from safealign.families import FAMILIES
    from safealign.merging import MERGE_RULES
    from safealign.methods import METHODS
    from safealign.prompts.backends import PROMPT_BACKENDS
    from safealign.training import LOSSES

    for reg in (DETECTORS, QUALITY, FAMILIES, MERGE_RULES, METHODS, PROMPT_BACKENDS, LOSSES):
        for name in reg:
            assert callable(reg.get(name)), f"{reg.kind} {name!r}"


def raw_params() -> dict[str, Any]:
    return read_yaml((ROOT / "params.yaml").read_text())


def test_toy_settings_are_validated_only_for_the_toy_family() -> None:
    raw = raw_params()
    raw["toy"]["concepts"]["violence"]["unsafe"] = "crimson"
    with pytest.raises(ParamsError, match=r"toy\.concepts\.violence.*'crimson' is not a toy color"):
        validate(raw)
    raw["model"]["family"] = "sd15"
    p = validate(raw)  # an SD user's params are not judged by the toy world's vocabulary
    assert p.model.family == "sd15" and isinstance(p.toy, dict)
    del raw["toy"]
    assert validate(raw).toy is None


def test_unknown_method_is_named_with_the_allowed() -> None:
    raw = raw_params()
    raw["method"] = "magic"
    with pytest.raises(ParamsError, match=r"params\.yaml: method: unknown method 'magic'; allowed: .*safetydpo"):
        validate(raw)


# ------------------------------------------------------------------------------ losses and terms
def test_loss_takes_a_per_pair_record_and_weighted_reduction() -> None:
    from safealign.training.losses import PreferenceBatch, diffusion_dpo, reduce

    z = torch.zeros(2)
    batch = PreferenceBatch(err_w=torch.tensor([0.1, 0.2]), err_l=torch.tensor([0.3, 0.2]), ref_err_w=z + 0.2,
                            ref_err_l=z + 0.2, weight=torch.tensor([2.0, 0.0]),
                            cost_w=torch.tensor([0.0, 0.0]), cost_l=torch.tensor([1.0, 1.0]))
    out = diffusion_dpo(batch, beta=10.0)
    # pair 0: inside = -5 * [(0.1 - 0.3) - 0] = 1.0; pair 1: inside = 0 -> log 2
    expected = torch.tensor([float(np.log1p(np.exp(-1.0))), float(np.log(2.0))])
    assert_close(out.losses, expected)
    assert_close(out.reward_w - out.reward_l, torch.tensor([1.0, 0.0]))
    assert_close(reduce(out.losses, batch.weight), 2.0 * expected[0] / 2)
    assert_close(reduce(out.losses), expected.mean())


@pytest.fixture(scope="module")
def tiny_toy() -> Any:
    from safealign.families.toy import ToyFamily

    return ToyFamily.build(image_size=8, patch=2, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)


def test_a_new_term_needs_no_new_step_parameter(tiny_toy: Any) -> None:
    """A term written outside the training package plugs into the step as it is, and adds weight * value."""
    from safealign.training import LOSSES
    from safealign.training.step import preference_step
    from safealign.training.terms import ActiveTerm, Term, TermInputs

    class RejectedError(Term):
        name, param = "rejected", "rejected_weight"

        def __call__(self, inputs: TermInputs) -> torch.Tensor:
            return inputs.pairs.err_l.mean()

    fam = tiny_toy
    fam.add_lora(2, 2.0, ["to_k", "to_v"], name="term_test")
    try:
        x = torch.randn(3, 12, 4, 4, generator=torch.Generator().manual_seed(1))
        cond = fam.encode_prompts(["a red circle"] * 3)
        args = (fam, x, x.flip(0), cond, LOSSES.get("dpo"), 5.0)
        plain = preference_step(*args, torch.Generator().manual_seed(0))
        added = preference_step(*args, torch.Generator().manual_seed(0), [ActiveTerm(RejectedError(), 0.5)])
        assert_close(added.loss, plain.loss + 0.5 * torch.tensor(plain.err_l))
        assert added.terms == {"rejected": pytest.approx(plain.err_l)}
    finally:
        fam.raw_unet.delete_adapters("term_test")


# ------------------------------------------------------------------------------ families
def test_predict_routes_extra_cross_attention_conditioning(tiny_toy: Any) -> None:
    """Keys `xattn.*` reach every attention processor (without the prefix); the family does not know them."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen: list[torch.Tensor] = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     user_tokens=None, **kw):
            if user_tokens is not None:
                seen.append(user_tokens)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    fam = tiny_toy
    old = fam.unet.attn_processors
    fam.unet.set_attn_processor(Recording())
    try:
        x = torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 500])
        cond = fam.encode_prompts(["a red circle", "a blue square"])
        with torch.no_grad():
            plain = fam.predict(x, t, cond)
            tokens = torch.randn(2, 3, 16)
            routed = fam.predict(x, t, {**cond, "xattn.user_tokens": tokens})
        n_attn = len(fam.unet.attn_processors)
        assert len(seen) == n_attn and all(s is tokens for s in seen)
        assert_close(routed, plain)  # the recording processor ignores them: same prediction
    finally:
        fam.unet.set_attn_processor(old)


def test_guidance_rule_replaces_classifier_free(tiny_toy: Any) -> None:
    calls: list[float] = []

    def only_cond(u: torch.Tensor, c: torch.Tensor, w: float, t: torch.Tensor, state: dict) -> torch.Tensor:
        calls.append(float(t))
        state["n"] = state.get("n", 0) + 1
        return c

    fam = tiny_toy
    a = fam.render(["a red circle"], [3], steps=3, guidance=1.0)
    b = fam.render(["a red circle"], [3], steps=3, guidance=5.0, combine=only_cond)
    assert len(calls) == 3
    assert np.array_equal(a, b)  # guidance 1 is the conditional prediction alone


# ------------------------------------------------------------------------------ params keys vs dvc.yaml
RUNTIME_KEYS = ("runtime",)  # threads and device: how to run, not what is computed (docs/architecture.md)


def _track(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Record the dotted params keys read after load_params returns: a field of a section, or a whole section
    turned into a dict (model_dump)."""
    from pydantic import BaseModel

    import safealign.core.params as params_module

    log: dict[str, set[str]] = {"keys": set()}
    paths: dict[int, tuple[str, Any]] = {}  # id -> (dotted prefix, the object itself: ids are never reused)
    real_load, real_get = params_module.load_params, BaseModel.__getattribute__
    real_dump = BaseModel.model_dump

    def walk(obj: Any, prefix: str) -> None:
        paths[id(obj)] = (prefix, obj)
        for name in type(obj).model_fields:
            value = real_get(obj, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")

    def getattribute(self: Any, name: str) -> Any:
        value = real_get(self, name)
        prefix, obj = paths.get(id(self), (None, None))
        if obj is self and name in type(self).model_fields and not isinstance(value, BaseModel):
            log["keys"].add(prefix + name)
        return value

    def dump(self: Any, *a: Any, **k: Any) -> Any:
        prefix, obj = paths.get(id(self), (None, None))
        if obj is self and prefix:
            log["keys"].add(prefix.rstrip("."))
        return real_dump(self, *a, **k)

    def load(*a: Any, **k: Any) -> Any:
        p = real_load(*a, **k)
        paths.clear()
        walk(p, "")
        return p

    monkeypatch.setattr(params_module, "load_params", load)
    monkeypatch.setattr(BaseModel, "__getattribute__", getattribute)
    monkeypatch.setattr(BaseModel, "model_dump", dump)
    return log


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared) or key.startswith(RUNTIME_KEYS)


@pytest.mark.slow
def test_every_params_key_a_stage_reads_is_in_its_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "project")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    categories = read_yaml((project / "params.yaml").read_text())["categories"]
    log = _track(monkeypatch)
    runs = [("prompts", ()), ("base", ()), ("render", ()), ("users", ()),
            *[("train", ("--category", c)) for c in categories], ("train", ("--category", "all")), ("merge", ()),
            ("cost", ()), ("clean", ()), ("align", ()), ("attack", ()), ("evaluate", ())]
    read: dict[str, set[str]] = {}
    for stage, args in runs:
        log["keys"] = set()
        run_inline(project, stage, *args)
        name = "train_all" if args[-1:] == ("all",) else stage
        read.setdefault(name, set()).update(log["keys"])
    raw = read_yaml((project / "params.yaml").read_text())  # SC-DPO's experts mode with clean pairs reads most
    raw["method"] = "sc_dpo"
    raw["sc_dpo"].update(mode="experts", clean_share=0.5)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("clean", "align", "evaluate"):  # clean renders only for sc_dpo: its keys of that path too
        log["keys"] = set()
        run_inline(project, stage)
        read[stage].update(log["keys"])
    assert {"sc_dpo", "merge.method"} <= read["align"] or "sc_dpo.clean_share" in read["align"], read["align"]
    # the tracking sees field reads, whole-section dumps, and reads deep inside the library
    assert {"train", "seed", "categories"} <= read["train"], read["train"]
    assert {"merge.method", "merge.scale", "prompts.calibration_per_category"} <= read["merge"], read["merge"]
    assert {"evaluate.blur_unsafe", "base.steps", "toy.concepts"} <= read["base"], read["base"]
    assert {"toy.concepts", "evaluate.detectors", "method"} <= read["evaluate"], read["evaluate"]
    gaps = {}
    for name, keys in read.items():
        declared = [str(p) for p in dvc[name].get("do", dvc[name]).get("params", [])]
        missing = sorted(k for k in keys if not _covered(k, declared))
        if missing:
            gaps[name] = missing
    assert gaps == {}, f"params read but not declared in dvc.yaml: {gaps}"


def test_model_options_are_validated_by_the_family_that_owns_them() -> None:
    from types import SimpleNamespace

    from safealign.families import get_family

    sd15 = get_family("sd15")
    assert sd15.check_options({"variant": "fp16"}) == {"variant": "fp16"}
    with pytest.raises(ParamsError, match=r"model\.options\.varient: unknown key for family 'sd15'; allowed: .*variant"):
        sd15.check_weights(SimpleNamespace(path="/nonexistent", options={"varient": "fp16"}))
    with pytest.raises(ParamsError, match=r"model\.options\.config: unknown key; the toy family takes no"):
        get_family("toy").check_options({"config": "x"})


def test_the_step_forwards_per_pair_costs_and_weights_to_the_loss(tiny_toy: Any) -> None:
    from safealign.training.losses import LossOutput, PreferenceBatch, diffusion_dpo
    from safealign.training.step import preference_step

    seen: list[PreferenceBatch] = []

    def recording(batch: PreferenceBatch, beta: float) -> LossOutput:
        seen.append(batch)
        return diffusion_dpo(batch, beta)

    fam = tiny_toy
    fam.add_lora(2, 2.0, ["to_k", "to_v"], name="cost_test")
    try:
        x = torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(2))
        cond = fam.encode_prompts(["a red circle"] * 2)
        cw, cl, w = torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.8]), torch.tensor([1.0, 3.0])
        out = preference_step(fam, x, x.flip(0), cond, recording, 5.0, torch.Generator().manual_seed(0),
                              weight=w, cost_w=cw, cost_l=cl)
        assert seen[0].cost_w is cw and seen[0].cost_l is cl and seen[0].weight is w
        assert_close(out.loss, (w * diffusion_dpo(seen[0], 5.0).losses).mean())
    finally:
        fam.raw_unet.delete_adapters("cost_test")
