"""The model-family interface: what training, rendering, merging and evaluation need from a text-to-image model.

A family wraps a denoiser (a diffusers ``UNet2DConditionModel``), its noise scheduler, and whatever encodes
prompts and images into the space the denoiser works in. Code that trains or renders calls only the methods
here and never names a family; families are looked up by name in ``FAMILIES`` (filled by the family modules).

Conventions:
- images: float tensors in [0, 1], shape (N, 3, H, W); on disk uint8 PNG.
- ``encode_images`` maps images to model space x0 (pixels in [-1, 1] for the toy, VAE latents for SD).
- a condition ``Cond`` is a dict of batch-first tensors; ``cond_cat`` / ``cond_index`` act on all of them.
- ``target(x0, noise, t)`` is what the denoiser predicts: the noise (epsilon families) or the velocity
  (v-prediction families, from the scheduler's ``get_velocity``).
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from stages.registry import Registry, import_optional

Cond = dict[str, torch.Tensor]

LORA_PREFIX = "unet."  # diffusers' key convention for a UNet LoRA (load_lora_weights reads it)


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
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        return self.unet(
            x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=extra or None, return_dict=False,
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

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
               batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Render prompts from seeds with DDIM and classifier-free guidance; returns uint8 (N, H, W, 3)."""
        out = []
        sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        bar = tqdm(total=len(prompts), desc="render", disable=not progress, leave=False)
        for i in range(0, len(prompts), batch_size):
            p, s = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
            cond = self.encode_prompts(p)
            both = cond_cat([self.empty_cond(len(p)), cond])
            x = self.initial_noise(s).to(self.device, self.dtype) * sched.init_noise_sigma
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                tt = torch.full((2 * len(p),), int(t), device=self.device)
                u, c = self.predict(xin, tt, both).chunk(2)
                x = sched.step(u + guidance * (c - u), t, x).prev_sample
            img = self.decode(x).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            out.append((img * 255).round().astype(np.uint8))
            bar.update(len(p))
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int, alpha: float, targets: Sequence[str], init: str = "gaussian",
                 name: str = "default") -> None:
        """Attach a trainable LoRA (fp32) to the denoiser; the base weights stay frozen."""
        self.unet.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)
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
        sd = get_peft_model_state_dict(self.raw_unet)
        return {LORA_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in sd.items()}

    def load_lora(self, path: Path, name: str = "default") -> dict[str, str]:
        """Attach the LoRA stored at ``path`` (safetensors written by ``save_lora``)."""
        sd, meta = read_lora(path)
        self.add_lora(int(meta["rank"]), float(meta["alpha"]), meta["targets"].split(","), name=name)
        peft_sd = {k[len(LORA_PREFIX):]: v for k, v in sd.items()}
        result = set_peft_model_state_dict(self.unet, peft_sd, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ValueError(f"{path}: LoRA file lacks {len(missing)} weights the adapter needs, e.g. {missing[0]}")
        self.unet.requires_grad_(False)
        return meta

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """Adapted linear layers by their module name (keys match the LoRA state-dict keys)."""
        return {n: m for n, m in self.raw_unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


def save_lora(path: Path, state: dict[str, torch.Tensor], rank: int, alpha: float, targets: Sequence[str],
              **meta: str) -> None:
    """Write a LoRA state dict (keys ``unet.<module>.lora_A.weight`` / ``lora_B``) with its config as metadata."""
    from stages.io import atomic_path, safetensors_bytes

    md = {"rank": str(rank), "alpha": str(alpha), "targets": ",".join(targets), "format": "safetydpo-lora-v1"}
    md.update({k: str(v) for k, v in meta.items()})
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(safetensors_bytes({k: v.contiguous() for k, v in state.items()}, md))


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA written by ``save_lora``; refuses anything that is not safetensors and checks its shape."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA weights load from .safetensors only (pickle-based files are refused)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: LoRA file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    for key in ("rank", "alpha", "targets"):
        if key not in meta:
            raise ValueError(f"{path}: LoRA metadata lacks {key!r}")
    sd = load_file(str(path))
    rank = int(meta["rank"])
    bad = [k for k, v in sd.items() if ("lora_A" in k and v.shape[0] != rank) or ("lora_B" in k and v.shape[1] != rank)]
    if bad:
        raise ValueError(f"{path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, not rank {rank} as its metadata says")
    a_keys = {k.replace("lora_A", "") for k in sd if "lora_A" in k}
    b_keys = {k.replace("lora_B", "") for k in sd if "lora_B" in k}
    if a_keys != b_keys or not a_keys:
        raise ValueError(f"{path}: LoRA keys are incomplete (every lora_A needs its lora_B)")
    return sd, meta


FAMILIES: Registry[Any] = Registry("model family")


def get_family(name: str) -> Any:
    """The family class registered under ``name`` (importing the family modules registers them)."""
    import_optional("stages.family_toy", "stages.family_sd")  # each registers its families on import
    return FAMILIES.get(name)
