"""The real families (sd15, sd21, sdxl) built tiny from their config classes with random weights.

Each runs the code path of the real model: render a pair, one DPO step, save the LoRA and reload it with diffusers'
``load_lora_weights``; renders are compared against the matching diffusers pipeline; nothing downloads.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import CLIPTextConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from safealign.core.errors import MissingWeights  # noqa: E402
from safealign.families import FAMILIES, get_family  # noqa: E402
from safealign.families.lora import save_lora  # noqa: E402
from safealign.training import LOSSES  # noqa: E402
from safealign.training.step import preference_step  # noqa: E402

REAL = ["sd15", "sd21", "sdxl"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT, STEPS, CFG = "a red cat on a mat", 3, 5.0


def tiny(name: str, seed: int = 0):
    return get_family(name).build_tiny(seed)


def pipeline_render(fam, lora: Path | None = None, seed: int = 3) -> np.ndarray:
    """The same prompt and start noise through a plain diffusers pipeline built from a fresh tiny family."""
    pipe = fam.pipeline()
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, latents=fam.initial_noise([seed]),
               output_type="np").images
    return (out * 255).round().astype(np.uint8)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to one uint8 step (batched and single-row float sums round differently)."""
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def trained_lora(fam, lr: float = 1e-2):
    """Attach a LoRA and take one DPO step with Adam; returns the step output and the base weights before it."""
    fam.add_lora(4, 4.0, TARGETS)
    base_before = {k: v.detach().clone() for k, v in fam.unet.state_dict().items() if "lora_" not in k}
    images = torch.rand(2, 3, fam.image_size, fam.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = fam.encode_images(images)
        cond = fam.encode_prompts([PROMPT])
    out = preference_step(fam, x0[:1], x0[1:], cond, LOSSES.get("dpo"), 5000.0, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(fam.lora_parameters(), lr=lr)
    out.loss.backward()
    grads = [p.grad for p in fam.lora_parameters()]
    opt.step()
    return out, grads, base_before


def test_registered() -> None:
    get_family("toy")
    assert set(REAL) <= set(FAMILIES)


def test_published_configs_have_the_published_sizes() -> None:
    """The configs written in safealign.families.sd build the released architectures (parameter counts, on the
    meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

    with torch.device("meta"):
        sizes = {name: millions(UNet2DConditionModel(**get_family(name).unet_config)) for name in REAL}
        assert millions(AutoencoderKL(**get_family("sd15").vae_config)) == 83.65
        encoders = [millions(cls(CLIPTextConfig(**cfg))) for cls, cfg in get_family("sdxl").text_configs]
    assert sizes == {"sd15": 859.52, "sd21": 865.91, "sdxl": 2567.46}
    assert encoders == [123.06, 694.66]


@pytest.mark.parametrize("name", REAL)
def test_render_pair_matches_diffusers_pipeline(name: str) -> None:
    fam = tiny(name)
    images = fam.render([PROMPT, "a dog"], [3, 4], steps=STEPS, guidance=CFG)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    assert_same_image(images[:1], pipeline_render(tiny(name)))


@pytest.mark.parametrize("name", REAL)
def test_latents_are_vae_scaled(name: str) -> None:
    fam = tiny(name)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x0 = fam.encode_images(images)
        raw = fam.vae.encode(images * 2 - 1).latent_dist.mode()
    assert x0.shape == (2, 4, 8, 8) and fam.latent_factor() == 8
    assert_close(x0, raw * fam.vae.config.scaling_factor)
    assert fam.decode(x0).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("name", REAL)
def test_dpo_step_and_lora_round_trip_through_diffusers(name: str, tmp_path: Path) -> None:
    fam = tiny(name)
    out, grads, base_before = trained_lora(fam)
    assert torch.isfinite(out.loss)
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    base_after = {k: v for k, v in fam.unet.state_dict().items() if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)

    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([400]), fam.encode_prompts([PROMPT])
    with torch.no_grad(), fam.adapters_disabled():  # the DPO reference: the base model, bit for bit
        assert_close(fam.predict(x, t, cond), tiny(name).predict(x, t, cond))
    assert all(p.requires_grad for p in fam.lora_parameters()) and len(fam.lora_parameters()) == len(grads)

    path = tmp_path / "lora.safetensors"
    save_lora(path, fam.lora_state_dict(), 4, 4.0, TARGETS)
    ours = fam.render([PROMPT], [3], steps=STEPS, guidance=CFG)
    plain, loaded = pipeline_render(tiny(name)), pipeline_render(tiny(name), lora=path)
    assert not np.array_equal(plain, loaded)  # the LoRA changes diffusers' output ...
    assert_same_image(loaded, ours)  # ... as it changes ours


def test_sd21_target_is_the_schedulers_velocity() -> None:
    fam = tiny("sd21")
    assert fam.prediction_type == "v_prediction"
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    assert_close(fam.target(x0, noise, t), fam.scheduler.get_velocity(x0, noise, t))
    assert not torch.allclose(fam.target(x0, noise, t), noise)
    assert tiny("sd15").prediction_type == "epsilon"


def test_sdxl_added_conditions_reach_the_unet() -> None:
    fam = tiny("sdxl")
    cond = fam.encode_prompts([PROMPT, "a dog"])
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # both encoders' penultimate states, concatenated
    assert cond["text_embeds"].shape == (2, 32)
    assert_close(cond["time_ids"][0], torch.tensor([64.0, 64, 0, 0, 64, 64]))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        base = fam.predict(x, t, cond)
        moved = fam.predict(x, t, {**cond, "time_ids": cond["time_ids"] * 2})
        pooled = fam.predict(x, t, {**cond, "text_embeds": cond["text_embeds"] + 1})
    assert not torch.allclose(base, moved) and not torch.allclose(base, pooled)
    empty = fam.empty_cond(2)  # SDXL's CFG negative: zeros, as force_zeros_for_empty_prompt
    assert empty["encoder_hidden_states"].abs().sum() == 0 and empty["text_embeds"].abs().sum() == 0


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_save_check_load_round_trip(name: str, tmp_path: Path) -> None:
    cls, fam = get_family(name), tiny(name)
    fam.save_components(tmp_path / "model")
    model = SimpleNamespace(family=name, path=str(tmp_path / "model"), options={}, resolution=64, dtype="float32")
    hashes = cls.check_weights(model)
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    assert hashes[unet_file] == hashlib.sha256((tmp_path / "model" / unet_file).read_bytes()).hexdigest()
    params = SimpleNamespace(model=model, sampling=SimpleNamespace(steps=STEPS, guidance=CFG, batch_size=8))
    metrics = cls.prepare_base(params, tmp_path / "base", tmp_path / "plots", "cpu")
    assert metrics["files"] == len(hashes)
    assert metrics["prediction_type"] == "epsilon" and metrics["resolution"] == 64
    assert (tmp_path / "plots" / "base_samples.png").is_file()
    assert json.loads((tmp_path / "base" / "weights.json").read_text())["sha256"] == hashes
    loaded = cls.from_params(params, tmp_path / "base", "cpu")
    np.testing.assert_array_equal(loaded.render([PROMPT], [1], STEPS, CFG), fam.render([PROMPT], [1], STEPS, CFG))


def _missing(name: str, path: str, **options: str) -> str:
    with pytest.raises(MissingWeights) as err:
        get_family(name).check_weights(SimpleNamespace(path=path, options=options))
    return str(err.value)


def test_missing_weights_name_the_param_and_what_to_put(tmp_path: Path) -> None:
    msg = _missing("sd15", "")
    assert "model.path is empty" in msg and "model.family=sd15" in msg and "model_index.json" in msg
    assert "not found" in _missing("sdxl", str(tmp_path / "nowhere"))
    assert "no model_index.json" in _missing("sd21", str(tmp_path))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle we would open")
    assert "only .safetensors" in _missing("sd15", str(ckpt))


def test_wrong_family_and_pickle_only_folders_are_refused(tmp_path: Path) -> None:
    tiny("sd15").save_components(tmp_path / "sd15")
    assert "not the StableDiffusionXLPipeline" in _missing("sdxl", str(tmp_path / "sd15"))
    unet = tmp_path / "sd15" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    assert "unet/ has no .safetensors" in _missing("sd15", str(tmp_path / "sd15"))


def test_single_file_checkpoint(tmp_path: Path) -> None:
    tiny("sd15").save_components(tmp_path / "config")
    single = tmp_path / "model.safetensors"
    save_file({"not_a_checkpoint": torch.zeros(2)}, str(single))
    model = SimpleNamespace(path=str(single), options={"config": str(tmp_path / "config")})
    hashes = get_family("sd15").check_weights(model)
    assert "model.safetensors" in hashes and "config/model_index.json" in hashes
    assert "model.options.config" in _missing("sd15", str(single), config=str(tmp_path))
    with pytest.raises(MissingWeights, match="model.path="):
        get_family("sd15").load(single, options={"config": str(tmp_path / "config")})
