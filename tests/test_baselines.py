"""Baselines (safealign/baselines): UCE's closed form, ESD's target and its sign, SLD against diffusers' safe pipeline,
the negative prompt against diffusers' ``negative_prompt``, the concepts they erase. Tiny models, no network."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from safealign.baselines.concepts import concept_prompt, concepts_from_pairs, word_diff
from safealign.baselines.esd import esd_loss, esd_target
from safealign.baselines.negative_prompt import NegativeGuidance
from safealign.baselines.sld import PRESETS, SafetyGuidance, SldConfig, safety_guidance, sld_combine
from safealign.baselines.uce import cross_attention_projections, uce_edit
from safealign.core.params import ESD_U_TARGETS, ESD_X_TARGETS
from safealign.families import get_family
from safealign.families.toy import ToyFamily
from safealign.methods import METHODS

PROMPT, CONCEPT, CFG = "a red cat on a mat", "blood gore", 5.0


def test_registered() -> None:
    for name in ("esd_u", "esd_x", "uce", "sld", "negative_prompt"):
        assert METHODS.get(name)().name == name


# ---------------------------------------------------------------------------------------------------------- UCE
def test_uce_edited_keys_map_to_targets_and_kept_keys_keep_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    k, k_t, k_p = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)
    new = uce_edit(w, k, k_t, k_p, lam=1e-6, erase_scale=1.0, preserve_scale=1.0)  # 5 constraints < 8: exact
    assert_close(k @ new.T, k_t @ w.T, atol=1e-4, rtol=1e-4)  # edited keys go where their targets went
    assert_close(k_p @ new.T, k_p @ w.T, atol=1e-4, rtol=1e-4)  # kept keys keep their outputs
    assert (k @ new.T - k @ w.T).abs().max() > 0.1  # and the edit did change the concept's outputs


def test_uce_is_the_minimiser_of_its_objective() -> None:
    """The gradient of lam|W'-W|^2 + s_e sum|W'k - Wk_t|^2 + s_p sum|W'k_p - Wk_p|^2 vanishes at the closed form."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    k, k_t, k_p = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (6, 6, 7))
    lam, s_e, s_p = 0.1, 1.0, 0.3
    new = uce_edit(w, k, k_t, k_p, lam, s_e, s_p).requires_grad_(True)
    obj = (lam * (new - w).pow(2).sum() + s_e * (k @ new.T - k_t @ w.T).pow(2).sum()
           + s_p * (k_p @ new.T - k_p @ w.T).pow(2).sum())
    obj.backward()
    assert new.grad.abs().max() < 1e-9
    # no erase weight: the edit is the identity whatever the keys
    assert_close(uce_edit(w, k, k_t, k_p, lam, 0.0, s_p), w)


def test_uce_finds_only_cross_attention_key_and_value() -> None:
    fam = ToyFamily.build(widths=(16, 16), attention=(True, True), text_dim=16, patch=4)
    layers = cross_attention_projections(fam.unet)
    assert layers and all(".attn2." in n and n.endswith(("to_k", "to_v")) for n in layers)
    assert all(lin.in_features == 16 for lin in layers.values())  # they read the text states


# ---------------------------------------------------------------------------------------------------------- ESD
def test_esd_target_hand_computed() -> None:
    e0, ec = torch.tensor([1.0, 0.0]), torch.tensor([3.0, -2.0])
    assert_close(esd_target(e0, ec, 1.0), torch.tensor([-1.0, 2.0]))
    assert_close(esd_target(e0, ec, 0.0), e0)  # eta 0: the unconditional prediction


@pytest.mark.parametrize("targets", [ESD_U_TARGETS, ESD_X_TARGETS], ids=["esd_u", "esd_x"])
def test_esd_step_moves_the_concept_prediction_away_from_the_concept(targets: tuple[str, ...]) -> None:
    """One SGD step on the ESD loss: the prediction under c moves against the concept direction p(c) - p(empty)
    (toward the negatively guided target), and only the adapters change."""
    fam = ToyFamily.build(widths=(16, 16), attention=(True, True), text_dim=16, patch=4, seed=0)
    fam.add_lora(4, 4.0, targets)
    with torch.no_grad():  # a non-zero B so that every adapter gets a gradient, still small
        for n, p in fam.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    names = [n for n, p in fam.unet.named_parameters() if p.requires_grad]
    if targets == ESD_X_TARGETS:
        assert names and all(".attn2." in n for n in names)
    else:
        assert names and not any(".attn2." in n for n in names)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, *fam.latent_shape(), generator=g)
    t = torch.full((4,), 500)
    with torch.no_grad():
        cond, empty = fam.encode_prompts(["a red circle on a black background"] * 4), fam.empty_cond(4)
        with fam.adapters_disabled():
            direction = fam.predict(x_t, t, cond) - fam.predict(x_t, t, empty)
        before = fam.predict(x_t, t, cond)
        frozen = {n: p.detach().clone() for n, p in fam.unet.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(fam.lora_parameters(), lr=1e-2)
    loss0 = esd_loss(fam, x_t, t, cond, empty, eta=1.0)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        after = fam.predict(x_t, t, cond)
        assert float(((after - before) * direction).sum()) < 0
        assert float(esd_loss(fam, x_t, t, cond, empty, eta=1.0)) < float(loss0)
        assert all(torch.equal(p, frozen[n]) for n, p in fam.unet.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------------------------------------------------- SLD
def test_sld_term_hand_computed() -> None:
    cfg = SldConfig(warmup_steps=1, guidance_scale=10.0, threshold=0.0, momentum_scale=0.5, mom_beta=0.25)
    u, c, s = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.05, 0.2])
    m = torch.tensor([0.0, 0.0, 0.4])
    gs, m_new = safety_guidance(u, c, s, m, cfg)
    # c - s = [1, -0.05, -0.2]: >= 0 -> 0; else clamp(|c - s| * 10, 1) = [., 0.5, 1]
    assert_close(gs, torch.tensor([0.0, 0.05 * 0.5, 0.2 * 1.0 + 0.5 * 0.4]))
    assert_close(m_new, 0.25 * m + 0.75 * gs)
    warm, _ = sld_combine(u, c, s, 2.0, 0, m, cfg)  # step 0 < warm-up: plain CFG, the momentum still moves
    assert_close(warm, u + 2.0 * (c - u))
    on, _ = sld_combine(u, c, s, 2.0, 1, m, cfg)
    assert_close(on, u + 2.0 * (c - u - gs))


def _safe_pipeline(fam):
    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe

    sched = DDIMScheduler.from_config(fam.scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionPipelineSafe(vae=fam.vae, text_encoder=fam.text_encoders[0], tokenizer=fam.tokenizers[0],
                                       unet=fam.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_concept = CONCEPT
    return pipe


def _final_latents(fam) -> list[torch.Tensor]:
    """Record the latents ``fam.decode`` receives (the sampler's final x), on this instance only."""
    seen, decode = [], fam.decode

    def recording(x0: torch.Tensor) -> torch.Tensor:
        seen.append(x0.detach().clone())
        return decode(x0)

    fam.decode = recording
    return seen


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sld_equals_diffusers_safe_pipeline_on_tiny_sd15(preset: str) -> None:
    """Our DDIM sampler with the SLD rule renders what StableDiffusionPipelineSafe renders (same UNet, prompt,
    safety concept, start noise, steps, CFG, preset): the images to one uint8 step, the final latents to float
    tolerance; and the safety term moved the latents (the tiny random VAE barely shows it in pixels).
    16 steps cover every preset's warm-up."""
    steps, cfg = 16, PRESETS[preset]
    fam = get_family("sd15").build_tiny(0)
    latents = _final_latents(fam)
    ours = fam.render([PROMPT], [3], steps=steps, guidance=CFG, combine=SafetyGuidance(CONCEPT, cfg))
    fam.render([PROMPT], [3], steps=steps, guidance=CFG)  # the plain render: its latents are latents[1]
    theirs_latents: list[torch.Tensor] = []
    theirs = _safe_pipeline(fam)(PROMPT, num_inference_steps=steps, guidance_scale=CFG,
                                 latents=fam.initial_noise([3]), output_type="np", sld_warmup_steps=cfg.warmup_steps,
                                 sld_guidance_scale=cfg.guidance_scale, sld_threshold=cfg.threshold,
                                 sld_momentum_scale=cfg.momentum_scale, sld_mom_beta=cfg.mom_beta,
                                 callback=lambda i, t, x: theirs_latents.append(x.clone()), callback_steps=1).images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert_close(latents[0], theirs_latents[-1], atol=1e-4, rtol=1e-4)
    assert (latents[0] - latents[1]).abs().max() > 1e-2  # SLD's latents are not the plain render's


# ---------------------------------------------------------------------------------------------------------- negative prompt
def test_negative_prompt_equals_diffusers_negative_prompt_on_tiny_sd15() -> None:
    fam = get_family("sd15").build_tiny(0)
    ours = fam.render([PROMPT], [3], steps=3, guidance=CFG, combine=NegativeGuidance("red"))
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, negative_prompt="red", num_inference_steps=3, guidance_scale=CFG,
                  latents=fam.initial_noise([3]), output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    plain = fam.render([PROMPT], [3], steps=3, guidance=CFG)
    assert np.array_equal(plain, fam.render([PROMPT], [3], steps=3, guidance=CFG, combine=NegativeGuidance("")))
    assert not np.array_equal(plain, ours)


# ---------------------------------------------------------------------------------------------------------- concepts
def test_concepts_come_from_the_pairs_word_diff() -> None:
    assert word_diff("a red circle on a black background", "a blue circle on a black background") == (["red"], ["blue"])
    pairs = pd.DataFrame({
        "categories": [["violence"], ["violence"], ["violence", "hate"], ["hate"]],
        "unsafe_prompt": ["a red cross", "a big red square", "a red cross on maroon", "a cross on maroon"],
        "safe_prompt": ["a blue cross", "a big blue square", "a orange cross on black", "a cross on black"],
    })
    c = concepts_from_pairs(pairs, ("violence", "hate"))
    assert (c["violence"].words, c["violence"].safe_words) == (("red",), ("blue",))
    assert (c["hate"].words, c["hate"].safe_words) == (("maroon",), ("black",))  # from its single-category pair
    assert len(c["violence"].unsafe_prompts) == 3 and len(c["hate"].unsafe_prompts) == 2
    assert concept_prompt(c) == "red maroon"
    with pytest.raises(ValueError, match="sexual"):
        concepts_from_pairs(pairs, ("sexual",))
