"""The sign of the DPO loss, pinned by behaviour (not only by algebra).

A tiny model learns a three-colour world. Then DPO trains on pairs whose *preferred* image is a red circle
while the condition is "a blue circle" (whose images are almost never red). The red rate of "a blue circle"
must rise well above its low start; with preferred and rejected swapped it must not rise.
"""
import numpy as np
import pytest
import torch

from safealign.families.toy import ToyFamily
from safealign.toyworld import world as tw
from safealign.toyworld.detect import detect_batch
from safealign.toyworld.pretrain import pretrain
from safealign.training import LOSSES
from safealign.training.step import preference_step

COLOURS = ("red", "blue", "green")
SEEDS = list(range(24))


def circles(colours, rng, n):
    scenes = [tw.Scene(str(rng.choice(colours)), "circle", "large", "black", template=3) for _ in range(n)]
    return [s.caption() for s in scenes], tw.draw_batch(scenes, 32, rng)


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    fam = ToyFamily.build(patch=4, widths=(32, 32), attention=(True, True), text_dim=32, seed=0)
    pretrain(fam, steps=250, batch_size=32, lr=3e-3, pool_size=0, caption_dropout=0.1, seed=0, progress=False,
             pool=circles(COLOURS, np.random.default_rng(0), 600))
    return fam.config, {k: v.clone() for k, v in fam.unet.state_dict().items()}, \
        {k: v.clone() for k, v in fam.text_encoder.state_dict().items()}


def fresh(base_state) -> ToyFamily:
    config, unet, text = base_state
    fam = ToyFamily(config)
    fam.unet.load_state_dict(unet)
    fam.text_encoder.load_state_dict(text)
    fam.eval()
    return fam


def red_rate(fam: ToyFamily) -> float:
    images = fam.render(["a blue circle"] * len(SEEDS), SEEDS, steps=10, guidance=2.0)
    return float(np.mean([d["color"] == "red" for d in detect_batch(images)]))


def train_pairs(fam: ToyFamily, prefer_red: bool, steps: int = 80) -> list[float]:
    rng = np.random.default_rng(1)
    red = [tw.Scene("red", "circle", "large", "black")] * 64
    blue = [tw.Scene("blue", "circle", "large", "black")] * 64
    x_red = fam.encode_images(torch.from_numpy(tw.draw_batch(red, 32, np.random.default_rng(2))).permute(0, 3, 1, 2))
    x_blue = fam.encode_images(torch.from_numpy(tw.draw_batch(blue, 32, np.random.default_rng(2))).permute(0, 3, 1, 2))
    x_w, x_l = (x_red, x_blue) if prefer_red else (x_blue, x_red)
    with torch.no_grad():
        cond = fam.encode_prompts(["a blue circle"] * 8)
    fam.add_lora(4, 4.0, ["attn2.to_k", "attn2.to_v"])
    opt = torch.optim.AdamW(fam.lora_parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    accuracy = []
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, 64, 8))
        out = preference_step(fam, x_w[idx], x_l[idx], cond, LOSSES.get("dpo"), beta=5.0, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accuracy.append(out.accuracy)
    return accuracy


@pytest.mark.slow
def test_preferred_attribute_rises_and_swapped_does_not(base_state):
    torch.set_num_threads(1)
    start = red_rate(fresh(base_state))
    assert start <= 0.2, f"the base model already renders 'a blue circle' red {start:.2f} of the time"

    fam = fresh(base_state)
    acc = train_pairs(fam, prefer_red=True)
    toward = red_rate(fam)

    fam = fresh(base_state)
    train_pairs(fam, prefer_red=False)
    away = red_rate(fam)

    print(f"red rate: start {start:.2f}, preferred=red {toward:.2f}, swapped {away:.2f}; "
          f"implicit accuracy (last 10) {np.mean(acc[-10:]):.2f}")
    assert toward >= start + 0.5
    assert away <= start + 0.05
