"""SC-DPO (safealign/sc_dpo): the loss on hand-computed values, its limits (Diffusion-DPO exactly), the gradient
of the cost margin and of the DFM weight, the cost model's losses and metrics by hand, a cost model that ranks
held-out toy images, and the `cost` stage and `method: sc_dpo` end to end on the tiny project."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_project, run_inline

from safealign.sc_dpo.cost import (
    anchoring_loss,
    auroc,
    calibration_error,
    category_contrast_loss,
    cost_metrics,
    image_cost,
    other_loss,
    pair_bt_loss,
)
from safealign.sc_dpo.loss import focal_weight, sc_dpo_loss
from safealign.training.losses import PreferenceBatch, diffusion_dpo


def softplus(x: float) -> float:  # -log sigmoid(-x), by hand
    return math.log1p(math.exp(x))


def batch(err_w: list[float], err_l: list[float], ref_w: list[float] | None = None, ref_l: list[float] | None = None,
          cost_w: list[float] | None = None, cost_l: list[float] | None = None, grad: bool = False) -> PreferenceBatch:
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=grad)
    n = len(err_w)
    return PreferenceBatch(t(err_w), t(err_l), t(ref_w or [0.0] * n), t(ref_l or [0.0] * n),
                           cost_w=None if cost_w is None else torch.tensor(cost_w, dtype=torch.float64),
                           cost_l=None if cost_l is None else torch.tensor(cost_l, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- the loss
def test_zero_lambda_and_gamma_is_diffusion_dpo_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    r = lambda: torch.rand(9, generator=gen)
    b = PreferenceBatch(r(), r(), r(), r(), cost_w=r(), cost_l=r())
    ours, ref = sc_dpo_loss(b, 7.0, lam=0.0, gamma=0.0), diffusion_dpo(b, 7.0)
    assert torch.equal(ours.losses, ref.losses)
    assert torch.equal(ours.reward_w, ref.reward_w) and torch.equal(ours.reward_l, ref.reward_l)
    assert torch.equal(sc_dpo_loss(b, 7.0).losses, ref.losses)  # the registry entry's defaults too


def test_cost_margin_on_hand_computed_values() -> None:
    # beta = 2: z = -(2 / 2) [(0.3 - 0.5) - (0.2 - 0.2)] = 0.2
    b = batch([0.3], [0.5], [0.2], [0.2], cost_w=[0.1], cost_l=[0.9])
    out = sc_dpo_loss(b, 2.0, lam=2.0)
    # m = z - lam (C_l - C_w) = 0.2 - 2 * 0.8 = -1.4;  L = -log sigmoid(-1.4) = log(1 + e^1.4)
    assert out.losses.item() == pytest.approx(softplus(1.4), abs=1e-12)
    assert diffusion_dpo(b, 2.0).losses.item() == pytest.approx(softplus(-0.2), abs=1e-12)


def test_cost_margin_gradient_favours_the_lower_cost_image() -> None:
    def grads(lam: float, cost_w: float, cost_l: float) -> tuple[float, float]:
        b = batch([0.4], [0.4], cost_w=[cost_w], cost_l=[cost_l], grad=True)
        sc_dpo_loss(b, 1.0, lam=lam).losses.sum().backward()
        return b.err_w.grad.item(), b.err_l.grad.item()

    g0_w, g0_l = grads(0.0, 0.1, 0.9)
    gw, gl = grads(1.5, 0.1, 0.9)  # the preferred image is the lower-cost one
    # gradient descent lowers err_w and raises err_l; the cost gap makes both pushes stronger
    assert gw > g0_w > 0 and gl < g0_l < 0
    sw, sl = grads(1.5, 0.9, 0.1)  # the preferred image is the costlier one: the push shrinks
    assert 0 < sw < g0_w and g0_l < sl < 0
    # exactly: dL/d err_w = (beta/2) sigmoid(-m), m = -lam (C_l - C_w) at zero DPO margin
    assert gw == pytest.approx(0.5 / (1 + math.exp(-1.5 * 0.8)), abs=1e-12)


def test_dfm_weight_grows_with_difficulty_and_carries_no_gradient() -> None:
    z = torch.tensor([3.0, 1.0, 0.0, -1.0, -3.0], requires_grad=True)  # easy -> hard
    w = focal_weight(z, 2.0)
    assert not w.requires_grad
    assert torch.all(w[1:] > w[:-1])
    assert w[2].item() == pytest.approx(0.25)  # (1 - sigmoid(0))^2
    assert torch.equal(focal_weight(z, 0.0), torch.ones(5))
    # the gradient is the weight times Diffusion-DPO's: nothing flows through the weight
    b1, b2 = batch([0.1, 0.7], [0.5, 0.2], grad=True), batch([0.1, 0.7], [0.5, 0.2], grad=True)
    sc_dpo_loss(b1, 3.0, gamma=2.0).losses.sum().backward()
    dpo = diffusion_dpo(b2, 3.0)
    dpo.losses.sum().backward()
    wz = focal_weight(dpo.reward_w - dpo.reward_l, 2.0)
    assert torch.allclose(b1.err_w.grad, wz * b2.err_w.grad) and torch.allclose(b1.err_l.grad, wz * b2.err_l.grad)


def test_registry_loss_and_costs_in_pair_data() -> None:
    from safealign.training import LOSSES
    from safealign.training.data import PairData

    assert LOSSES.get("sc_dpo") is sc_dpo_loss
    with pytest.raises(ValueError, match="per-pair costs"):
        sc_dpo_loss(batch([0.3, 0.3], [0.5, 0.5]), 2.0, lam=1.0)
    data = PairData(torch.zeros(3, 1), torch.zeros(3, 1), {"h": torch.zeros(3, 2)},
                    cost_w=torch.tensor([0.0, 0.1, 0.2]), cost_l=torch.tensor([0.9, 1.0, 0.5]))
    picked = data.select(torch.tensor([2, 0]))
    assert torch.equal(picked.cost_w, torch.tensor([0.2, 0.0])) and torch.equal(picked.cost_l, torch.tensor([0.5, 0.9]))
    assert PairData(torch.zeros(2, 1), torch.zeros(2, 1), {}).select(torch.tensor([1])).cost_w is None


# ------------------------------------------------------------------------------------ the cost model's maths
def test_cost_losses_on_hand_computed_values() -> None:
    one = torch.ones(2, 1, dtype=torch.bool)
    s_u, s_s = torch.tensor([[2.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    # pair BT: mean(-log sigmoid(2 - 0), -log sigmoid(0 - 1))
    assert pair_bt_loss(s_u, s_s, one).item() == pytest.approx((softplus(-2) + softplus(1)) / 2, abs=1e-6)
    # contrast: every (unsafe i, safe j): differences 2, 1, 0, -1
    want = (softplus(-2) + softplus(-1) + softplus(0) + softplus(1)) / 4
    assert category_contrast_loss(s_u, s_s, one).item() == pytest.approx(want, abs=1e-6)
    # two categories, one pair each: no pair shares a category with another, so only i = j counts, per own k
    cats = torch.tensor([[True, False], [False, True]])
    s_u2, s_s2 = torch.tensor([[2.0, 9.0], [9.0, 0.0]]), torch.tensor([[0.0, -9.0], [-9.0, 1.0]])
    assert category_contrast_loss(s_u2, s_s2, cats).item() == pytest.approx((softplus(-2) + softplus(1)) / 2,
                                                                            abs=1e-6)
    # anchoring: ((1 - 0.8)^2 + 0.2^2) / 2 = 0.04 on the pair's own category; other: (0.3^2 + 0.1^2) / 2 = 0.05
    c_u, c_s, c1 = torch.tensor([[0.8, 0.3]]), torch.tensor([[0.2, 0.1]]), torch.tensor([[True, False]])
    assert anchoring_loss(c_u, c_s, c1).item() == pytest.approx(0.04, abs=1e-7)
    assert other_loss(c_u, c_s, c1).item() == pytest.approx(0.05, abs=1e-7)
    assert torch.allclose(image_cost(torch.tensor([[0.0, 2.0]])), torch.sigmoid(torch.tensor([2.0])))


def test_auroc_and_calibration_on_hand_computed_values() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # a tie counts half
    assert auroc(np.array([0.1]), np.array([1])) is None
    # 0.05 and 0.95 each alone in a bin, half the images each: 0.5 |0.05 - 0| + 0.5 |0.95 - 1| = 0.05
    assert calibration_error(np.array([0.05, 0.95]), np.array([0, 1])) == pytest.approx(0.05)
    assert calibration_error(np.array([0.51, 0.52]), np.array([0, 1])) == pytest.approx(abs(0.515 - 0.5))
    m = cost_metrics(np.array([0.9, 0.8]), np.array([0.1, 0.85]), np.array([True, True]), np.array([False, True]),
                     [["hate"], ["violence"]], ("hate", "violence"))
    assert m["auroc"]["hate"] == 1.0 and m["auroc"]["violence"] is None  # violence: both images harmful
    assert m["cost_safe_mean"] == pytest.approx(0.1) and m["cost_unsafe_mean"] == pytest.approx(0.85)
    assert m["pair_accuracy"] == pytest.approx(0.5)


def test_cost_model_trained_on_a_few_toy_pairs_ranks_held_out_unsafe_above_its_twin() -> None:
    """Drawn toy pairs (violence: red -> blue object; hate: maroon -> black background); a random-conv cost
    model trained on 12 pairs ranks each of 12 new pairs' unsafe image above its safe twin."""
    from types import SimpleNamespace

    from safealign.sc_dpo.costmodel import CostModel, category_matrix, fit_head
    from safealign.sc_dpo.encoders import RandomConvEncoder
    from safealign.toyworld import world as tw

    rng = np.random.default_rng(0)

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        u, s, cats = [], [], []
        for i in range(n):
            cat = ("violence", "hate")[i % 2]
            if cat == "violence":
                scene = tw.random_scene(rng, color="red", background="black")
                twin = {"color": "blue"}
            else:
                scene = tw.random_scene(rng, background="maroon", color="white")
                twin = {"background": "black"}
            u.append(tw.draw(scene, 16, np.random.default_rng(i)))
            s.append(tw.draw(type(scene)(**{**scene.__dict__, **twin}), 16, np.random.default_rng(i)))
            cats.append([cat])
        to8 = lambda x: (np.stack(x) * 255).round().astype(np.uint8)
        return to8(u), to8(s), cats

    torch.manual_seed(0)
    enc = RandomConvEncoder(SimpleNamespace(seed=0))
    cfg = SimpleNamespace(cost_hidden=16, cost_steps=150, cost_lr=0.01, cost_contrast_weight=1.0,
                          cost_anchor_weight=1.0, cost_other_weight=0.1)
    u, s, cats = pairs(12)
    head = fit_head(enc.features(u), enc.features(s), category_matrix(cats, ("hate", "violence")), cfg, 0)
    model = CostModel(enc, head)
    u2, s2, _ = pairs(12)
    cu, cs = model.costs(u2), model.costs(s2)
    assert np.all(cu > cs), (cu, cs)
    assert cu.mean() > 0.5 > cs.mean()


def test_clip_encoder_without_weights_is_a_named_error() -> None:
    from types import SimpleNamespace

    from safealign.core.errors import MissingWeights
    from safealign.sc_dpo.encoders import ClipEncoder

    with pytest.raises(MissingWeights, match="sc_dpo.encoder_path is not set"):
        ClipEncoder(SimpleNamespace(sc_dpo=SimpleNamespace(encoder_path="")))
    with pytest.raises(MissingWeights, match="does not exist"):
        ClipEncoder(SimpleNamespace(sc_dpo=SimpleNamespace(encoder_path="/nonexistent/clip")))


def test_params_without_an_sc_dpo_section_validate_and_bad_values_are_named() -> None:
    from conftest import ROOT, read_yaml

    from safealign.core.params import ParamsError, validate

    raw = read_yaml((ROOT / "params.yaml").read_text())
    older = {k: v for k, v in raw.items() if k != "sc_dpo"}  # a params file from before SC-DPO
    assert validate(older).sc_dpo.cost_lambda == 1.0
    assert validate(older).train == validate(raw).train  # the train section is untouched by SC-DPO
    with pytest.raises(ParamsError, match="sc_dpo.encoder"):
        validate({**raw, "sc_dpo": {"encoder": "vit_huge"}})
    with pytest.raises(ParamsError, match="sc_dpo.gamma"):
        validate({**raw, "sc_dpo": {"gamma": -1}})


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cost_stage_and_sc_dpo_method_on_the_tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prompts, base, render, cost, train@all, then align + evaluate with method sc_dpo: the cost metrics have
    the interface's keys; with cost_lambda = 0 and gamma = 0 the LoRA equals the All-single expert's tensors
    (the same loop, data and seed); with the defaults it differs; every params key the cost and align stages
    read under method sc_dpo is in their dvc.yaml params."""
    import yaml
    from conftest import ROOT
    from safetensors.torch import load_file
    from test_rails import _covered, _track

    project = make_project(tmp_path / "p", {"method": "sc_dpo", "sc_dpo.cost_lambda": 0.0, "sc_dpo.gamma": 0.0,
                                            "sc_dpo.clean_share": 0.0, "merge.method": "single"})  # trains all
    log = _track(monkeypatch)
    read: dict[str, set[str]] = {}
    for stage, args in [("prompts", ()), ("base", ()), ("render", ()), ("cost", ()), ("train", ("--category", "all")),
                        ("align", ())]:
        log["keys"] = set()
        run_inline(project, stage, *args)
        read[stage] = set(log["keys"])
    monkeypatch.undo()
    cost = json.loads((project / "metrics/cost.json").read_text())
    cats = yaml.safe_load((project / "params.yaml").read_text())["categories"]
    assert set(cost["auroc"]) == {*cats, "overall"}
    for key in ("cost_safe_mean", "cost_unsafe_mean"):  # null where the tiny base renders no image of that label
        assert cost[key] is None or 0 <= cost[key] <= 1, (key, cost[key])
    assert 0 <= cost["cost_safe_side_mean"] <= 1 and 0 <= cost["pair_accuracy"] <= 1
    assert "held_out" in cost["protocol"] and (project / "models/cost/head.safetensors").exists()
    lora = load_file(str(project / "models/aligned/lora.safetensors"))
    expert = load_file(str(project / "models/experts/all.safetensors"))
    assert lora.keys() == expert.keys() and all(torch.equal(lora[k], expert[k]) for k in lora)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("cost", "align"):
        missing = sorted(k for k in read[stage] if not _covered(k, [str(p) for p in dvc[stage]["params"]]))
        assert missing == [], (stage, missing)
    assert {"sc_dpo.cost_lambda", "sc_dpo.gamma", "train"} <= read["align"] or "sc_dpo" in read["align"]

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["sc_dpo"].update(cost_lambda=1.0, gamma=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run_inline(project, "align")
    full = load_file(str(project / "models/aligned/lora.safetensors"))
    assert any(not torch.equal(full[k], expert[k]) for k in full)
    info = json.loads((project / "metrics/align.json").read_text())
    assert info["method"] == "sc_dpo" and info["train_cost_l_mean"] > info["train_cost_w_mean"]
    run_inline(project, "users")  # every method's per-user metrics
    run_inline(project, "evaluate")
    assert {"base", "aligned"} <= set(json.loads((project / "metrics/evaluate.json").read_text()))
