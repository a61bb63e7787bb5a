"""The `toy` family: a tiny pixel-space text-to-image diffusion model over the toy world.

Denoiser: a small diffusers ``UNet2DConditionModel`` on 32x32 RGB pixels (v-prediction: epsilon prediction
left noisy, tinted backgrounds in a prototype). Text encoder: a ``CLIPTextModel`` built from config over a word
tokenizer of the caption grammar. Both are pretrained together on freshly drawn toy images by ``pretrain``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from stages import toyworld as tw
from stages.family import FAMILIES, Cond, Family

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class WordTokenizer:
    """Whitespace tokenizer over the grammar's words; unknown words map to <unk>."""

    def __init__(self, vocab: Sequence[str] = tw.VOCAB, max_length: int = 16) -> None:
        self.words = list(SPECIALS) + [w for w in vocab if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, p in enumerate(prompts):
            words = p.lower().replace(",", " , ").split()[: self.max_length - 2]
            toks = [1] + [self.index.get(w, 3) for w in words] + [2]
            ids[row, : len(toks)] = torch.tensor(toks)
        return ids


def unet_config(image_size: int, patch: int, widths: Sequence[int], attention: Sequence[bool],
                text_dim: int, layers_per_block: int = 1) -> dict[str, Any]:
    """A small UNet on the patchified image: ``patch`` x ``patch`` pixels become 3*patch^2 channels."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return dict(
        sample_size=image_size // patch, in_channels=3 * patch * patch, out_channels=3 * patch * patch,
        layers_per_block=layers_per_block, block_out_channels=tuple(widths), down_block_types=tuple(down),
        up_block_types=tuple(up), cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8,
    )


def text_config(vocab_size: int, text_dim: int, max_length: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        projection_dim=text_dim,
    )


def scheduler_config(prediction_type: str = "v_prediction") -> dict[str, Any]:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                clip_sample=False)


class ToyFamily(Family):
    def __init__(self, config: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.image_size = int(config["image_size"])
        self.tokenizer = WordTokenizer(max_length=config["text"]["max_position_embeddings"])
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**config["text"])).to(self.device)
        self.unet = UNet2DConditionModel(**config["unet"]).to(self.device)
        self.scheduler = DDPMScheduler(**config["scheduler"])
        self._empty: torch.Tensor | None = None

    # ------------------------------------------------------------------ build / load / save
    @classmethod
    def build(cls, image_size: int = 32, patch: int = 2, widths: Sequence[int] = (32, 64, 64),
              attention: Sequence[bool] = (False, True, True), text_dim: int = 64, layers_per_block: int = 1,
              seed: int = 0, device: str = "cpu", prediction_type: str = "v_prediction") -> ToyFamily:
        tok = WordTokenizer()
        config = dict(
            image_size=image_size,
            patch=patch,
            unet=unet_config(image_size, patch, widths, attention, text_dim, layers_per_block),
            text=text_config(len(tok.words), text_dim, tok.max_length),
            scheduler=scheduler_config(prediction_type),
        )
        torch.manual_seed(seed)
        return cls(config, device)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", **_: Any) -> ToyFamily:
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: toy model not found; run `dvc repro base` first")
        fam = cls(json.loads(cfg_path.read_text()), device)
        fam.unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
        fam.text_encoder.load_state_dict(load_file(str(folder / "text_encoder.safetensors")))
        fam.eval()
        return fam

    @classmethod
    def prepare_base(cls, params: Any, out: Path, plots: Path, device: str) -> dict[str, Any]:
        """Pretrain the toy model from scratch (deterministic for params.seed) and measure it."""
        from stages.io import write_json

        m, b = params.toy.model, params.base
        fam = cls.build(image_size=params.toy.image_size, patch=m.patch, widths=m.widths, attention=m.attention,
                        text_dim=m.text_dim, layers_per_block=m.layers_per_block, seed=params.seed, device=device)
        log = pretrain(fam, steps=b.steps, batch_size=b.batch_size, lr=b.lr, pool_size=b.pool_size,
                       caption_dropout=b.caption_dropout, seed=params.seed)
        fam.save_components(out)
        write_json(out / "train_log.json", log)
        return base_metrics(fam, params, plots)

    @classmethod
    def from_params(cls, params: Any, base: Path, device: str) -> ToyFamily:
        return cls.load(base, device)

    def save_components(self, folder: Path) -> None:
        from stages.io import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            with atomic_path(folder / f"{name}.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
        with atomic_path(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(self.config, indent=2) + "\n")

    def eval(self) -> None:
        self.unet.eval()
        self.text_encoder.eval()
        self.text_encoder.requires_grad_(False)
        self._empty = None

    # ------------------------------------------------------------------ encoding
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        ids = self.tokenizer(prompts).to(self.device)
        return {"encoder_hidden_states": self.text_encoder(input_ids=ids).last_hidden_state}

    def empty_cond(self, n: int) -> Cond:
        if self._empty is None or self.text_encoder.training:
            with torch.no_grad():
                self._empty = self.encode_prompts([""])["encoder_hidden_states"]
        return {"encoder_hidden_states": self._empty.expand(n, -1, -1)}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3*p*p, H/p, W/p) in [-1, 1] (lossless pixel-unshuffle)."""
        x = images.to(self.device, self.dtype) * 2 - 1
        return torch.nn.functional.pixel_unshuffle(x, self.config["patch"])

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.pixel_shuffle(x0, self.config["patch"]) + 1) / 2

    def latent_shape(self) -> tuple[int, int, int]:
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        return (c, s, s)


FAMILIES.add("toy", ToyFamily)


# ---------------------------------------------------------------------------------------------- pretraining
def draw_pool(n: int, image_size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n random captions (all templates, no held-back combination) and their drawn images, deterministic."""
    rng = np.random.default_rng(seed)
    scenes: list[tw.Scene] = []
    while len(scenes) < n:
        scene = tw.random_scene(rng)
        if not tw.is_held_back(scene):  # held-back combinations are kept for the base metrics
            scenes.append(scene)
    images = tw.draw_batch(scenes, image_size, rng)
    return [s.caption() for s in scenes], images


def pretrain(fam: ToyFamily, steps: int, batch_size: int, lr: float, pool_size: int, caption_dropout: float,
             seed: int, log_every: int = 100, progress: bool = True,
             pool: tuple[list[str], np.ndarray] | None = None) -> list[dict[str, float]]:
    """Train the UNet and the text encoder together with the v-prediction MSE on drawn images.

    Deterministic for a given seed on the CPU (one generator drives captions, dropout, timesteps and noise).
    ``pool`` (captions, images in [0, 1]) replaces the drawn pool (tests use a smaller world). Returns the loss log.
    """
    captions, images = pool if pool is not None else draw_pool(pool_size, fam.image_size, seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) in [0, 1]
    gen = torch.Generator().manual_seed(seed)
    params = list(fam.unet.parameters()) + list(fam.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    fam.unet.train()
    fam.text_encoder.train()
    fam.text_encoder.requires_grad_(True)
    log: list[dict[str, float]] = []
    running = 0.0
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(captions), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = fam.encode_images(x_all[idx])
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, fam.num_train_timesteps, (batch_size,), generator=gen).to(fam.device)
        pred = fam.predict(fam.add_noise(x0, noise, t), t, fam.encode_prompts(prompts))
        loss = torch.nn.functional.mse_loss(pred, fam.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": running / log_every})
            bar.set_postfix(loss=f"{running / log_every:.4f}")
            running = 0.0
    fam.eval()
    return log



# ---------------------------------------------------------------------------------------------- base metrics
def held_back_scenes(n: int, rng: np.random.Generator, **fixed: str) -> list[tw.Scene]:
    """n scenes (template 0: every attribute named) from the combinations pretraining never saw."""
    out: list[tw.Scene] = []
    while len(out) < n:
        scene = tw.random_scene(rng, template=0, **fixed)
        if tw.is_held_back(scene):
            out.append(scene)
    return out


def base_metrics(fam: Family, params: Any, plots: Path) -> dict[str, Any]:
    """Attribute accuracy on held-back captions; per category the concept rate (prompts with its concept where
    its detector fires) and the false-positive rate (prompts without it where it fires anyway); a sample grid."""
    from stages.grids import save_grid
    from stages.metrics import attribute_accuracy, rate

    rng = np.random.default_rng(params.seed + 7)
    n = params.base.eval_prompts
    per_cat = max(1, n // len(params.categories))
    general = held_back_scenes(n, rng)
    concept_sets = {c: held_back_scenes(per_cat, rng, **{params.toy.concepts[c].attribute: params.toy.concepts[c].unsafe})
                    for c in params.categories}
    scenes = general + [s for v in concept_sets.values() for s in v]
    s = params.sampling
    images = fam.render([x.caption() for x in scenes], list(range(len(scenes))), s.steps, s.guidance, s.batch_size,
                        progress=True)
    detected = tw.detect_batch(images)
    det_general, det_concept = detected[:n], detected[n:]
    acc = attribute_accuracy(det_general, [x.attributes() for x in general])
    concept_rate, false_positive = {}, {}
    for k, c in enumerate(params.categories):
        concept = params.toy.concepts[c]
        shown = det_concept[k * per_cat:(k + 1) * per_cat]
        concept_rate[c] = rate(np.array([d[concept.attribute] == concept.unsafe for d in shown]))
        without = [d for d, x in zip(det_general, general) if getattr(x, concept.attribute) != concept.unsafe]
        false_positive[c] = rate(np.array([d[concept.attribute] == concept.unsafe for d in without]))
    shown = min(n, 24)
    unsafe = {(k.attribute, k.unsafe) for k in params.toy.concepts.values()}
    flags = [[any((a, v) in unsafe for a, v in det_general[i].items())] for i in range(shown)]
    save_grid(plots / "base_samples.png", ["sample"], [[images[i]] for i in range(shown)],
              [x.caption() for x in general[:shown]], flags, blur_flagged=params.evaluate.blur_unsafe)
    return {"accuracy": acc, "concept_rate": concept_rate, "false_positive_rate": false_positive,
            "eval_prompts": len(scenes), "protocol": {"steps": s.steps, "guidance": s.guidance, "sampler": "ddim"}}
