"""The preserve term (train.preserve_weight): the LoRA's change of the cross-attention keys and values on benign
prompts' tokens, relative to the base ones. Hand-computed on a 2 x 2 layer; zero for a fresh LoRA; off means
the loss without it exactly (and its rows never enter the denoiser's pass); its gradient shrinks the edit on a
prompt of a template it never saw; a LoRA that reads no text condition is refused by name."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import drift_lora

from safealign.families.toy import ToyFamily
from safealign.toyworld import world as tw
from safealign.training import LOSSES
from safealign.training.step import preference_step
from safealign.training.terms import ActiveTerm, PreserveTerm, TermInputs, active_terms, relative_edit


@pytest.fixture
def fam(lora_family: ToyFamily) -> ToyFamily:
    return lora_family


def drift(fam: ToyFamily, scale: float = 0.5) -> None:
    drift_lora(fam, scale)


def edit(fam: ToyFamily, prompts: list[str]) -> float:
    with torch.no_grad():
        return PreserveTerm()(TermInputs(None, cond=fam.encode_prompts(prompts), family=fam)).item()


def images(fam: ToyFamily, colours: list[str], seed: int) -> torch.Tensor:
    scenes = [tw.Scene(c, "circle", "large", "black") for c in colours]
    return fam.encode_images(torch.from_numpy(tw.draw_batch(scenes, 32, np.random.default_rng(seed))).permute(0, 3, 1, 2))


def test_relative_edit_by_hand() -> None:
    # h = I (two tokens), W = I, A = [[1, 0]], B = [[0], [2]], scaling 0.5: the edit is [[0, 1], [0, 0]]
    # (squared norm 1), the base outputs are I (squared norm 2): 1 / 2
    h, w = torch.eye(2), torch.eye(2)
    value = relative_edit(h, w, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [2.0]]), 0.5)
    assert value.item() == pytest.approx(0.5)
    # a (batch, tokens, dim) input is the same tokens
    assert relative_edit(h[None], w, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [2.0]]), 0.5).item() == \
        pytest.approx(0.5)


def test_zero_for_a_fresh_lora_positive_after_drift_and_only_condition_modules(fam: ToyFamily) -> None:
    prompts = ["a large orange circle on a black background", "a white square"]
    assert edit(fam, prompts) == 0.0  # peft's gaussian init: B = 0
    drift(fam)
    assert edit(fam, prompts) > 1e-3
    names = [n for n, m in fam.lora_modules().items() if any(m is mm for _, mm in
                                                              fam.condition_modules(fam.encode_prompts(prompts)))]
    assert names and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)


def test_weight_zero_is_the_loss_without_it_and_its_rows_skip_the_denoiser(fam: ToyFamily) -> None:
    drift(fam)
    x_w, x_l = images(fam, ["blue"] * 4, 0), images(fam, ["red"] * 4, 0)
    with torch.no_grad():
        cond = fam.encode_prompts(["a red circle"] * 4)
        rows = (images(fam, ["green"] * 4, 1), fam.encode_prompts(["a green circle"] * 4))

    def terms(weight: float) -> list[ActiveTerm]:
        cfg = SimpleNamespace(anchor_weight=0.0, sft_weight=0.0, preserve_weight=weight)
        return [ActiveTerm(t, getattr(cfg, t.param), rows if t.rows_from else None) for t in active_terms(cfg)]

    calls = []
    predict = fam.predict
    fam.predict = lambda x_t, t, c: calls.append(x_t.shape[0]) or predict(x_t, t, c)
    plain = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0))
    off = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0), terms(0.0))
    on = preference_step(fam, x_w, x_l, cond, LOSSES.get("dpo"), 5.0, torch.Generator().manual_seed(0), terms(3.0))
    assert off.loss.item() == plain.loss.item() and "preserve" not in off.terms
    assert set(calls) == {8}  # 4 pairs, preferred and rejected: the preserve rows never ride in the pass
    assert on.terms["preserve"] == pytest.approx(edit(fam, ["a green circle"] * 4), rel=1e-5)
    assert on.margin == pytest.approx(plain.margin, rel=1e-6)
    assert on.loss.item() == pytest.approx(plain.loss.item() + 3.0 * on.terms["preserve"], rel=1e-5)


def test_gradient_shrinks_the_edit_on_an_unseen_template(fam: ToyFamily) -> None:
    """Steps whose only gradient is the preserve term (preferred = rejected image) on short captions shrink the
    LoRA's edit on captions of a template those rows never use; with weight 0 nothing moves."""
    drift(fam)
    state = {k: v.clone() for k, v in fam.lora_state_dict().items()}
    colours = ["cyan", "orange", "white", "purple", "blue"]
    unseen = [f"a picture of a {c} circle , large , on black" for c in colours]
    start = edit(fam, unseen)
    with torch.no_grad():
        rows = (images(fam, colours, 7), fam.encode_prompts([f"a {c} square" for c in colours]))
        cond = fam.encode_prompts(["a red circle"] * 2)
    x = images(fam, ["blue"] * 2, 0)

    def run(weight: float) -> float:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(fam.raw_unet, {k.removeprefix("unet."): v.clone() for k, v in state.items()})
        opt = torch.optim.SGD(fam.lora_parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(0)
        cfg = SimpleNamespace(anchor_weight=0.0, sft_weight=0.0, preserve_weight=weight)
        for _ in range(40):
            terms = [ActiveTerm(t, getattr(cfg, t.param), rows if t.rows_from else None) for t in active_terms(cfg)]
            out = preference_step(fam, x, x, cond, LOSSES.get("dpo"), 5.0, gen, terms)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return edit(fam, unseen)

    shrunk, still = run(1.0), run(0.0)
    assert shrunk < 0.5 * start, (start, shrunk)
    assert still == pytest.approx(start, rel=1e-6), (start, still)


def test_a_lora_off_the_text_condition_is_refused(fam: ToyFamily) -> None:
    f = ToyFamily.build(patch=4, widths=(16, 16), attention=(True, True), text_dim=16, seed=0)
    f.eval()
    f.add_lora(4, 4.0, ["attn1.to_q"])
    with pytest.raises(ValueError, match="train.preserve_weight.*train.targets"):
        edit(f, ["a red circle"])
