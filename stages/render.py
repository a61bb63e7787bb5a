"""Stage `render`: the base model renders both prompts of every training pair from the pair's seed.

    python -m stages.render     # -> data/render/{images/*.png, manifest.parquet, cache.safetensors}

Resumes after an interruption without redoing finished batches (see stages.rendering). The cache holds what
training needs, encoded once: model-space images of both sides (x0_w = safe, x0_l = unsafe), the condition
of each pair's unsafe prompt (`cond.*`) and of its safe prompt (`cond_safe.*`, for the anchor term), so
training never re-encodes an image or a prompt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from stages.config import load_params, setup_runtime
from stages.family import get_family
from stages.io import atomic_path, read_table, write_table
from stages.pairs import PAIR_COLUMNS
from stages.rendering import model_key, render_to_folder

OUT = Path("data/render")
BASE = Path("models/base")


def encode_cache(fam, manifest: pd.DataFrame, images_u: np.ndarray, images_s: np.ndarray,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Model-space images and the conditions of both prompts for every pair, in manifest order."""
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(manifest), batch_size):
            sl = slice(i, i + batch_size)
            to_t = lambda a: torch.from_numpy(a[sl]).permute(0, 3, 1, 2).float() / 255  # noqa: E731
            parts.setdefault("x0_w", []).append(fam.encode_images(to_t(images_s)).cpu())
            parts.setdefault("x0_l", []).append(fam.encode_images(to_t(images_u)).cpu())
            for prefix, column in (("cond", "unsafe_prompt"), ("cond_safe", "safe_prompt")):
                for k, v in fam.encode_prompts(list(manifest[column].iloc[sl])).items():
                    parts.setdefault(f"{prefix}.{k}", []).append(v.cpu())
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    pairs = read_table(Path("data/prompts/pairs.parquet"), PAIR_COLUMNS)
    train = pairs[pairs.split == "train"].reset_index(drop=True)
    if train.empty:
        raise ValueError("data/prompts/pairs.parquet: no training pairs (split == 'train')")
    fam = get_family(params.model.family).from_params(params, BASE, device)
    s = params.sampling
    names = [f"{p}_{side}" for p in train.pair_id for side in ("u", "s")]
    prompts = [x for u, sp in zip(train.unsafe_prompt, train.safe_prompt) for x in (u, sp)]
    seeds = [int(x) for x in np.repeat(train.seed.to_numpy(), 2)]
    key = model_key(sorted(f for f in BASE.iterdir() if f.is_file()), extra=params.model.model_dump())
    images = render_to_folder(fam, prompts, seeds, names, OUT / "images", s.steps, s.guidance, s.batch_size, key)
    manifest = train.assign(unsafe_image=[f"images/{p}_u.png" for p in train.pair_id],
                            safe_image=[f"images/{p}_s.png" for p in train.pair_id])
    cache = encode_cache(fam, manifest, images[0::2], images[1::2], s.batch_size)
    with atomic_path(OUT / "cache.safetensors") as tmp:
        save_file(cache, str(tmp), metadata={"pair_ids": json.dumps(list(manifest.pair_id))})
    write_table(OUT / "manifest.parquet", manifest)
    print(f"render: {len(manifest)} pairs -> {OUT}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
