"""The model-family interface: what training, rendering, merging and evaluation need from a text-to-image model.

A family wraps a denoiser (a diffusers ``UNet2DConditionModel``), its noise scheduler, and whatever encodes
prompts and images into the space the denoiser works in. Code that trains or renders calls only the methods
here and never names a family; families are looked up by name in ``safealign.families.FAMILIES``.

Conventions:
- images: float tensors in [0, 1], shape (N, 3, H, W); on disk uint8 PNG.
- ``encode_images`` maps images to model space x0 (pixels in [-1, 1] for the toy, VAE latents for SD).
- a condition ``Cond`` is a dict of batch-first tensors; ``cond_cat`` / ``cond_index`` act on all of them.
  ``predict`` routes its keys: ``encoder_hidden_states`` (text), ``xattn.*`` (to the attention processors),
  the rest (``added_cond_kwargs``).
- ``target(x0, noise, t)`` is what the denoiser predicts: the noise (epsilon families) or the velocity
  (v-prediction families, from the scheduler's ``get_velocity``).
"""
from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from safealign.families import lora
from safealign.families.sampling import Guidance, ddim_render

Cond = dict[str, torch.Tensor]

ATTENTION_PREFIX = "xattn."  # cond keys routed to the attention processors (cross_attention_kwargs)


def cond_cat(conds: Sequence[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_index(cond: Cond, idx: torch.Tensor | slice) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


class Family(abc.ABC):
    """One model family. Subclasses build their components and say how prompts and images are encoded."""

    unet: UNet2DConditionModel
    scheduler: Any  # a diffusers training scheduler (DDPMScheduler-like: add_noise, get_velocity)
    image_size: int
    device: torch.device
    dtype: torch.dtype = torch.float32

    # ------------------------------------------------------------------ encoding
    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Cond: ...

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> x0 in model space."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in model space -> (N, 3, H, W) in [0, 1]."""

    @abc.abstractmethod
    def save_components(self, folder: Path) -> None:
        """Write the weights the family needs (safetensors) so that ``load`` can rebuild it."""

    @classmethod
    @abc.abstractmethod
    def prepare_base(cls, params: Any, out: Path, plots: Path, device: str) -> dict[str, Any]:
        """The `base` stage: make the base model available under ``out`` (the toy family pretrains it; real
        families check and hash local weights) and return the base metrics."""

    @classmethod
    @abc.abstractmethod
    def from_params(cls, params: Any, base: Path, device: str) -> Family:
        """Load the base model the `base` stage prepared, ready for rendering and training."""

    # ------------------------------------------------------------------ diffusion maths
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's prediction. ``cond``: ``encoder_hidden_states`` (text states); keys starting with
        ``xattn.`` go, without the prefix, to every attention processor as ``cross_attention_kwargs`` (extra
        conditioning such as additional key/value tokens, which no family needs to know about); every other key
        goes to the UNet's ``added_cond_kwargs`` (SDXL's pooled text embeddings and time ids)."""
        attn = {k[len(ATTENTION_PREFIX):]: v for k, v in cond.items() if k.startswith(ATTENTION_PREFIX)}
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states" and not k.startswith(ATTENTION_PREFIX)}
        return self.unet(
            x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added or None, cross_attention_kwargs=attn or None, return_dict=False,
        )[0]

    def empty_cond(self, n: int) -> Cond:
        c = self.encode_prompts([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}

    # ------------------------------------------------------------------ rendering
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One noise tensor per seed, so a row renders the same whatever batch it lands in."""
        shape = self.latent_shape()
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def latent_shape(self) -> tuple[int, int, int]:
        c = self.raw_unet.config
        f = self.latent_factor()
        return (c.in_channels, self.image_size // f, self.image_size // f)

    def latent_factor(self) -> int:
        return 1

    def render(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
               batch_size: int = 64, progress: bool = False, combine: Guidance | None = None) -> np.ndarray:
        """Render prompts from seeds with DDIM and classifier-free guidance; returns uint8 (N, H, W, 3).
        ``combine`` replaces the guidance rule (``safealign.families.sampling``)."""
        return ddim_render(self, prompts, seeds, steps, guidance, batch_size, progress, combine)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int, alpha: float, targets: Sequence[str], init: str = "gaussian",
                 name: str = "default") -> None:
        """Attach a trainable LoRA (fp32) to the denoiser; the base weights stay frozen."""
        self.unet.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)
        with warnings.catch_warnings():  # peft warns when a named adapter joins others: here it is meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.unet.add_adapter(cfg, adapter_name=name)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @property
    def raw_unet(self) -> UNet2DConditionModel:
        """The denoiser itself, also when a distributed wrapper (DDP) holds it."""
        return getattr(self.unet, "module", self.unet)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The reference model of DPO: the same denoiser with its adapters switched off."""
        self.raw_unet.disable_adapters()
        try:
            yield
        finally:
            self.raw_unet.enable_adapters()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return lora.module_state(self.raw_unet)

    def load_lora(self, path: Path, name: str = "default") -> dict[str, str]:
        """Attach the LoRA stored at ``path`` (safetensors written by ``lora.save_lora``)."""
        sd, meta = lora.read_lora(path)
        self.add_lora(int(meta["rank"]), float(meta["alpha"]), meta["targets"].split(","), name=name)
        result = lora.set_module_state(self.unet, sd, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]  # other adapters' keys aside
        if missing:
            raise ValueError(f"{path}: LoRA file lacks {len(missing)} weights the adapter needs, e.g. {missing[0]}")
        self.unet.requires_grad_(False)
        return meta

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """Adapted linear layers by their module name (keys match the LoRA state-dict keys)."""
        return {n: m for n, m in self.raw_unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}

    condition_suffixes: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")  # diffusers' UNets: cross-attention K, V

    def condition_modules(self, cond: Cond) -> list[tuple[torch.Tensor, torch.nn.Module]]:
        """(input, module) for each adapted layer whose input is the text condition (the cross-attention keys
        and values, ``condition_suffixes``), with the ``encoder_hidden_states`` of ``cond`` as that input."""
        h = cond["encoder_hidden_states"]
        return [(h, m) for n, m in self.lora_modules().items() if n.endswith(self.condition_suffixes)]
