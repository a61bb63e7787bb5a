"""The toy family: deterministic pretraining, rendering from seeds, LoRA round trips through safetensors."""
import numpy as np
import pytest
import torch

from safealign.families.lora import read_lora, save_lora
from safealign.families.toy import ToyFamily, WordTokenizer
from safealign.toyworld.pretrain import pretrain

TINY = dict(patch=4, widths=(16, 16), attention=(True, True), text_dim=16)


def trained(seed: int = 0, steps: int = 4) -> ToyFamily:
    fam = ToyFamily.build(**TINY, seed=seed)
    pretrain(fam, steps=steps, batch_size=4, lr=1e-3, pool_size=32, caption_dropout=0.1, seed=seed, progress=False)
    return fam


def test_short_pretraining_lowers_the_loss_and_is_bit_identical_for_a_seed():
    torch.set_num_threads(1)
    a, b = trained(0, steps=30), trained(0, steps=30)
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(va, vb), k
    c = trained(1, steps=30)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_pretraining_reduces_the_loss():
    torch.set_num_threads(1)
    fam = ToyFamily.build(**TINY, seed=0)
    log = pretrain(fam, steps=60, batch_size=8, lr=3e-3, pool_size=64, caption_dropout=0.0, seed=0, log_every=20,
                   progress=False)
    assert log[-1]["loss"] < log[0]["loss"]


def test_render_depends_on_seed_not_on_batch():
    fam = trained()
    prompts, seeds = ["a red circle", "a blue square", "a green cross"], [5, 6, 7]
    together = fam.render(prompts, seeds, steps=3, guidance=2.0, batch_size=3)
    alone = fam.render(prompts[1:2], seeds[1:2], steps=3, guidance=2.0, batch_size=1)
    assert together.dtype == np.uint8 and together.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(together[1].astype(int), alone[0].astype(int), atol=1)
    assert not np.array_equal(together[0], fam.render(prompts[:1], [99], steps=3, guidance=2.0)[0])


def test_images_round_trip_through_model_space():
    fam = trained()
    x = torch.rand(2, 3, 32, 32)
    z = fam.encode_images(x)
    assert z.shape == (2, 48, 8, 8) and z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(fam.decode(z), x)


def test_save_load_components(tmp_path):
    fam = trained()
    fam.save_components(tmp_path)
    back = ToyFamily.load(tmp_path)
    for (k, va), vb in zip(fam.unet.state_dict().items(), back.unet.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(FileNotFoundError, match="dvc repro base"):
        ToyFamily.load(tmp_path / "missing")


def test_lora_save_and_reload_changes_the_output_the_same_way(tmp_path):
    fam = trained()
    before = fam.render(["a red circle"], [1], steps=3, guidance=2.0)
    fam.add_lora(4, 4.0, ["to_k", "to_v"], init="gaussian")
    with torch.no_grad():
        for p in fam.lora_parameters():
            p.add_(0.5 * torch.randn_like(p))
    with_lora = fam.render(["a red circle"], [1], steps=3, guidance=2.0)
    assert not np.array_equal(before, with_lora)
    with fam.adapters_disabled():
        np.testing.assert_array_equal(fam.render(["a red circle"], [1], steps=3, guidance=2.0), before)
    path = tmp_path / "lora.safetensors"
    save_lora(path, fam.lora_state_dict(), 4, 4.0, ["to_k", "to_v"], category="violence")
    state, meta = read_lora(path)
    assert meta["category"] == "violence" and all(k.startswith("unet.") for k in state)
    fresh = trained()
    fresh.load_lora(path)
    np.testing.assert_array_equal(fresh.render(["a red circle"], [1], steps=3, guidance=2.0), with_lora)


def test_tokenizer_maps_unknown_words_and_pads():
    ids = WordTokenizer(max_length=8)(["a red circle", "a zebra"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == 1 and ids[1, 2] == 3 and ids[1, 3] == 2 and ids[1, 4:].eq(0).all()
