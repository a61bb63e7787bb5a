"""The two terms added to Diffusion-DPO.

Anchor (train.anchor_weight): zero at the reference, off means the paper's loss exactly, and its gradient pulls a
drifted model back toward the reference on prompts it was never given.
Supervised term (train.sft_weight): off means the paper's loss exactly; on, it adds w * err_w, and its gradient
lowers the preferred image's denoising error."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import drift_lora

from safealign.families.toy import ToyFamily
from safealign.toyworld import world as tw
from safealign.training import LOSSES
from safealign.training.step import preference_step
from safealign.training.terms import ActiveTerm, active_terms, anchor_loss


@pytest.fixture
def fam(lora_family: ToyFamily) -> ToyFamily:
    return lora_family


def terms(anchor: tuple | None = None, anchor_weight: float = 0.0, sft_weight: float = 0.0) -> list[ActiveTerm]:
    """The weighted terms as the training loop builds them from params.train: only those with weight > 0
    (``active_terms``), the anchor term with its rows."""
    cfg = SimpleNamespace(anchor_weight=anchor_weight, sft_weight=sft_weight, preserve_weight=0.0)
    return [ActiveTerm(t, getattr(cfg, t.param), anchor if t.rows_from else None) for t in active_terms(cfg)]


def images(fam: ToyFamily, colours: list[str], seed: int) -> torch.Tensor:
    scenes = [tw.Scene(c, "circle", "large", "black") for c in colours]
    return fam.encode_images(torch.from_numpy(tw.draw_batch(scenes, 32, np.random.default_rng(seed))).permute(0, 3, 1, 2))


def drift(fam: ToyFamily, scale: float = 0.5) -> None:
    drift_lora(fam, scale)


def model_vs_reference(fam: ToyFamily, prompts: list[str], x0: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, fam.num_train_timesteps, (len(prompts),), generator=g)
    x_t = fam.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        cond = fam.encode_prompts(prompts)
        pred = fam.predict(x_t, t, cond)
        with fam.adapters_disabled():
            ref = fam.predict(x_t, t, cond)
    return anchor_loss(pred, ref).item()


def test_anchor_loss_is_zero_at_the_reference_and_positive_after_drift(fam: ToyFamily) -> None:
    x0 = images(fam, ["green"] * 4, 0)
    prompts = ["a large green circle on a black background"] * 4
    assert model_vs_reference(fam, prompts, x0) == 0.0  # a fresh LoRA has B = 0
    drift(fam)
    assert model_vs_reference(fam, prompts, x0) > 1e-4


def test_weight_zero_is_the_papers_loss(fam: ToyFamily) -> None:
    drift(fam)
    x_w, x_l = images(fam, ["blue"] * 4, 0), images(fam, ["red"] * 4, 0)
    with torch.no_grad():
        cond = fam.encode_prompts(["a red circle"] * 4)
        anchor = (images(fam, ["green"] * 4, 1), fam.encode_prompts(["a green circle"] * 4))
    plain = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0))
    off = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0),
                          terms(anchor, 0.0))
    on = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0),
                         terms(anchor, 10.0))
    assert off.loss.item() == plain.loss.item() and off.terms.get("anchor", 0.0) == 0.0
    assert on.terms["anchor"] > 0
    # the pairs' rows see the same timestep and noise whether anchors ride along or not
    assert on.margin == pytest.approx(plain.margin, rel=1e-5, abs=1e-6)
    assert on.loss.item() == pytest.approx(plain.loss.item() + 10.0 * on.terms["anchor"], rel=1e-5)


def test_anchor_gradient_pulls_the_model_back_toward_the_reference(fam: ToyFamily) -> None:
    """Steps whose only gradient is the anchor term (the pairs' preferred and rejected images are the same, so
    the DPO part has none) shrink the model-reference gap on held-out prompts; with weight 0 nothing moves."""
    drift(fam)
    state = {k: v.clone() for k, v in fam.lora_state_dict().items()}
    held_x0 = images(fam, ["cyan", "orange", "white", "purple"], 5)
    held = [f"a large {c} circle on a black background" for c in ("cyan", "orange", "white", "purple")]
    start = model_vs_reference(fam, held, held_x0)
    colours = ["cyan", "orange", "white", "purple", "blue", "green"] * 2
    with torch.no_grad():
        a_x0 = images(fam, colours, 7)
        a_cond = fam.encode_prompts([f"a {c} circle" for c in colours])
    x = images(fam, ["blue"] * 2, 0)
    with torch.no_grad():
        cond = fam.encode_prompts(["a red circle"] * 2)

    def run(weight: float) -> float:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(fam.raw_unet, {k.removeprefix("unet."): v.clone() for k, v in state.items()})
        opt = torch.optim.SGD(fam.lora_parameters(), lr=0.2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(40):
            out = preference_step(fam, x, x, cond, LOSSES.get("dpo"), 5.0, gen, terms((a_x0, a_cond), weight))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return model_vs_reference(fam, held, held_x0)

    pulled, still = run(1.0), run(0.0)
    assert pulled < 0.5 * start, (start, pulled)
    assert still == pytest.approx(start, rel=1e-6), (start, still)


# ---------------------------------------------------------------------- supervised term
def test_weight_zero_is_the_papers_loss_and_on_adds_w_times_err_w(fam: ToyFamily) -> None:
    x_w, x_l = images(fam, ["orange"] * 4, 0), images(fam, ["yellow"] * 4, 0)
    with torch.no_grad():
        cond = fam.encode_prompts(["a large yellow circle on a black background"] * 4)

    def step(**weight: float):
        return preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0),
                               terms(**weight))

    plain, off, on = step(), step(sft_weight=0.0), step(sft_weight=3.0)
    assert off.loss.item() == plain.loss.item()
    assert on.loss.item() == pytest.approx(plain.loss.item() + 3.0 * plain.err_w, rel=1e-5)
    assert on.margin == pytest.approx(plain.margin, abs=1e-7)


def test_sft_gradient_lowers_the_preferred_error(fam: ToyFamily) -> None:
    """With preferred == rejected the DPO part has no gradient: only the supervised term moves the model, and it
    lowers the error on the preferred image (weight 0: nothing moves)."""
    x = images(fam, ["orange"] * 4, 0)
    with torch.no_grad():
        cond = fam.encode_prompts(["a large yellow circle on a black background"] * 4)
    state = {k: v.clone() for k, v in fam.lora_state_dict().items()}

    def run(weight: float) -> tuple[float, float]:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(fam.raw_unet, {k.removeprefix("unet."): v.clone() for k, v in state.items()})
        opt = torch.optim.SGD(fam.lora_parameters(), lr=5.0)
        errs = []
        for _ in range(30):
            out = preference_step(fam, x, x, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0),
                                  terms(sft_weight=weight))
            errs.append(out.err_w)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return errs[0], errs[-1]

    start, end = run(1.0)
    assert end < 0.93 * start, (start, end)
    start0, end0 = run(0.0)
    assert end0 == pytest.approx(start0, rel=1e-6)
