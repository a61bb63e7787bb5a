"""The `toy` family: a tiny pixel-space text-to-image diffusion model over the toy world.

Its pretraining and base metrics live with the toy world (``safealign.toyworld.pretrain``).

Denoiser: a small diffusers ``UNet2DConditionModel`` on 32x32 RGB pixels (v-prediction: epsilon prediction
left noisy, tinted backgrounds in a prototype). Text encoder: a ``CLIPTextModel`` built from config over a word
tokenizer of the caption grammar. Both are pretrained together on freshly drawn toy images by ``pretrain``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from safealign.core.errors import ParamsError
from safealign.families.base import Cond, Family
from safealign.toyworld import world as tw

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
        """Pretrain the toy model from scratch (deterministic for params.seed) and measure it
        (``safealign.toyworld.pretrain``)."""
        from safealign.core.io import write_json
        from safealign.toyworld.pretrain import base_metrics, pretrain
        from safealign.toyworld.settings import toy_settings

        cls.check_options(params.model.options)
        toy, b = toy_settings(params), params.base
        m = toy.model
        fam = cls.build(image_size=toy.image_size, patch=m.patch, widths=m.widths, attention=m.attention,
                        text_dim=m.text_dim, layers_per_block=m.layers_per_block, seed=params.seed, device=device)
        log = pretrain(fam, steps=b.steps, batch_size=b.batch_size, lr=b.lr, pool_size=b.pool_size,
                       caption_dropout=b.caption_dropout, seed=params.seed)
        fam.save_components(out)
        write_json(out / "train_log.json", log)
        return base_metrics(fam, params, plots)

    @classmethod
    def from_params(cls, params: Any, base: Path, device: str) -> ToyFamily:
        cls.check_options(params.model.options)
        return cls.load(base, device)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """The toy family takes no ``model.options`` (its shape is ``toy.model``)."""
        if options:
            raise ParamsError(f"params.yaml: model.options.{sorted(options)[0]}: unknown key; the toy family takes "
                              "no model.options (its settings are under toy:)")

    def save_components(self, folder: Path) -> None:
        from safealign.core.io import atomic_path

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

