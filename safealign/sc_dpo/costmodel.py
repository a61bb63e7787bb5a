"""The safety cost model: a frozen encoder (``safealign.sc_dpo.ENCODERS``) and a trained ``CostHead``.

Trained on the render stage's pairs (``data/render``: the unsafe prompt's image and its safe twin's, both by
the base model), with labels from the pairs, never from a detector. A share of the pairs (``sc_dpo.holdout``,
chosen per pair id by a seeded hash) is held out: never trained on, it is where the cost model is measured.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safealign.core.hashing import int_seed
from safealign.core.io import atomic_path, read_table, safetensors_bytes
from safealign.core.paths import RENDER
from safealign.core.runtime import poll_threads
from safealign.families.rendering import load_png
from safealign.sc_dpo import ENCODERS
from safealign.sc_dpo.cost import cost_objective, image_cost
from safealign.sc_dpo.encoders import CostHead

HEAD = "head.safetensors"


@dataclasses.dataclass
class RenderPairs:
    """The render stage's pairs: ids, categories (lists) and images (uint8 (N, H, W, 3) each side)."""

    pair_ids: list[str]
    categories: list[list[str]]
    images_u: np.ndarray
    images_s: np.ndarray

    def take(self, mask: np.ndarray) -> RenderPairs:
        idx = np.flatnonzero(mask)
        return RenderPairs([self.pair_ids[i] for i in idx], [self.categories[i] for i in idx],
                           self.images_u[idx], self.images_s[idx])


def read_render_pairs(render: Path = RENDER) -> RenderPairs:
    m = read_table(Path(render) / "manifest.parquet", ["pair_id", "categories", "unsafe_image", "safe_image"])
    images_u = np.stack([load_png(Path(render) / p) for p in m.unsafe_image])
    images_s = np.stack([load_png(Path(render) / p) for p in m.safe_image])
    return RenderPairs(list(m.pair_id), [list(c) for c in m.categories], images_u, images_s)


def holdout_mask(pair_ids: list[str], share: float, seed: int) -> np.ndarray:
    """bool (N,): the pair is held out. A seeded hash of its id, so the split does not depend on row order."""
    return np.array([int_seed("sc_dpo.holdout", seed, p) % 10_000 < share * 10_000 for p in pair_ids], bool)


def category_matrix(categories: list[list[str]], names: tuple[str, ...]) -> torch.Tensor:
    """(N, K) bool: pair i belongs to category names[k]."""
    return torch.tensor([[n in cats for n in names] for cats in categories], dtype=torch.bool).view(-1, len(names))


def fit_head(feats_u: torch.Tensor, feats_s: torch.Tensor, cats: torch.Tensor, cfg: Any, seed: int) -> CostHead:
    """Train a head on (N, D) features of the unsafe and safe sides: full-batch Adam, ``cfg.cost_steps`` steps,
    objective ``safealign.sc_dpo.cost.cost_objective``."""
    torch.manual_seed(seed)
    head = CostHead(feats_u.shape[1], cfg.cost_hidden, cats.shape[1])
    both = torch.cat([feats_u, feats_s])
    head.feat_mean.copy_(both.mean(0))
    head.feat_std.copy_(both.std(0).clamp(min=1e-6))
    opt = torch.optim.Adam(head.mlp.parameters(), lr=cfg.cost_lr)
    for _ in range(cfg.cost_steps):
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        loss = cost_objective(head(feats_u), head(feats_s), cats, cfg.cost_contrast_weight, cfg.cost_anchor_weight,
                              cfg.cost_other_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


class CostModel:
    """Encoder + head: ``costs(images uint8 (N, H, W, 3)) -> float (N,)`` in [0, 1]."""

    def __init__(self, encoder: Any, head: CostHead) -> None:
        self.encoder, self.head = encoder, head

    @torch.no_grad()
    def costs(self, images: np.ndarray) -> np.ndarray:
        return image_cost(self.head(self.encoder.features(images))).numpy()


def make_encoder(params: Any, device: str) -> Any:
    return ENCODERS.get(params.sc_dpo.encoder)(params, device)


def save_head(folder: Path, head: CostHead, encoder: Any, categories: tuple[str, ...], **meta: Any) -> Path:
    """The head in safetensors (byte-stable), its encoder's protocol and categories (one logit each) as metadata."""
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    info = {"encoder": json.dumps(encoder.protocol(), sort_keys=True), "hidden": str(head.mlp[0].out_features),
            "categories": json.dumps(list(categories)),
            **{k: str(v) for k, v in meta.items()}}
    path = Path(folder) / HEAD
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, metadata=info))
    return path


def load_cost_model(params: Any, folder: Path, device: str = "cpu") -> CostModel:
    """The cost stage's model: the encoder named by ``sc_dpo.encoder`` and the head in ``folder``."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD
    if not path.exists():
        raise FileNotFoundError(f"{path}: the cost model is missing; run `dvc repro cost`")
    encoder = make_encoder(params, device)
    state = load_file(str(path))
    head = CostHead(encoder.dim, state["mlp.0.weight"].shape[0], state["mlp.2.weight"].shape[0])
    head.load_state_dict(state)
    return CostModel(encoder, head.eval())


def mean_costs(params: Any, folder: Path, images: dict[str, tuple[np.ndarray, np.ndarray]],
               device: str = "cpu") -> tuple[dict[str, dict[str, float]], str | None]:
    """Per model, the cost model's mean cost of its test images (``cost_mean``) and benign images
    (``cost_mean_benign``): how harmful the cost model finds what the model renders (evaluate's column for
    every method). ``images``: model -> (test images, benign images). ({}, reason) if there is no cost model."""
    if not (Path(folder) / HEAD).exists():
        return {}, f"{Path(folder) / HEAD} missing; run `dvc repro cost`"
    from safealign.core.errors import MissingWeights

    try:
        model = load_cost_model(params, folder, device)
    except MissingWeights as e:
        return {}, str(e)
    return {m: {"cost_mean": float(model.costs(test).mean()), "cost_mean_benign": float(model.costs(benign).mean())}
            for m, (test, benign) in images.items()}, None
