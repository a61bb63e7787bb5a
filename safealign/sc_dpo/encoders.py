"""Frozen image encoders for the cost model (``ENCODERS``, ``sc_dpo.encoder``) and its small trainable head.

An encoder is a factory ``(params, device) -> encoder`` with ``dim`` and ``features(images) -> (N, dim)`` (images:
uint8 (N, H, W, 3)), frozen (no parameter trains), and ``protocol()`` (what it is, for the metrics).

- ``random_conv`` (toy): a fixed random convolutional net, seeded by ``seed``. It is *not* the toy world's exact
  detector: it knows nothing of colours or concepts, the head learns harm from the pairs' labels.
- ``clip`` (SD families): the image tower of a local CLIP ViT-L/14 in ``transformers`` format
  (``sc_dpo.encoder_path``, local files only); its projected image embedding, L2-normalised. Missing weights
  raise ``MissingWeights`` naming the key to set, as the detectors do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safealign.core.errors import MissingWeights


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


class RandomConvEncoder:
    """Two random 3x3 conv layers with ReLU, then global mean and max pooling: (N, 2 * width) features."""

    name = "random_conv"

    def __init__(self, params: Any, device: str = "cpu", width: int = 32) -> None:
        gen = torch.Generator().manual_seed(params.seed * 7919 + 17)
        c1, c2 = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1, stride=2)
        with torch.no_grad():
            for conv in (c1, c2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
        self.net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU()).requires_grad_(False).eval()
        self.dim = 2 * width

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            h = self.net(to_float(images[i:i + batch_size]) * 2 - 1)  # (n, width, H/2, W/2)
            out.append(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))  # (n, 2 * width)
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def protocol(self) -> dict[str, Any]:
        return {"encoder": self.name, "dim": self.dim, "frozen": True, "seeded_by": "seed"}


class ClipEncoder:
    """The image tower of a local CLIP ViT-L/14 (``transformers``), frozen; projected, normalised embeddings."""

    name = "clip"

    def __init__(self, params: Any, device: str = "cpu") -> None:
        path = params.sc_dpo.encoder_path
        if not path or not Path(path).is_dir():
            where = f"={path} does not exist" if path else " is not set"
            raise MissingWeights(f"sc_dpo.encoder_path{where}: a local CLIP ViT-L/14 folder in transformers format "
                                 "(openai/clip-vit-large-patch14)")
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        except (OSError, ImportError) as e:
            raise MissingWeights(f"sc_dpo.encoder_path={path}: not a loadable CLIP vision model ({e})") from None
        self.device = device
        self.model = self.model.to(device).requires_grad_(False).eval()
        self.dim = int(self.model.config.projection_dim)
        self.path = path

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            px = self.processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            emb = self.model(pixel_values=px.to(self.device)).image_embeds.float().cpu()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def protocol(self) -> dict[str, Any]:
        return {"encoder": self.name, "path": self.path, "dim": self.dim, "frozen": True}


class CostHead(nn.Module):
    """Standardised features -> MLP -> one logit per image and category (``safealign.sc_dpo.cost.image_cost``
    turns them into the image's cost). The feature mean and std (of the training images) are buffers, saved
    with the head."""

    def __init__(self, dim: int, hidden: int, categories: int) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, categories))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N, categories) logits
        return self.mlp((feats - self.feat_mean) / self.feat_std)
