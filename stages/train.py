"""Stage `train@<category>` (and `train_all`): one LoRA safety expert trained with Diffusion-DPO.

Preferred = the safe image, rejected = the unsafe image, condition = the unsafe prompt. `--category all`
trains on every category's pairs (the paper's "All-single" baseline).

    python -m stages.train --category violence    # -> models/experts/violence.safetensors, metrics/train/violence.csv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stages.config import load_params, setup_runtime
from stages.family import cond_index, get_family, save_lora
from stages.io import read_table, write_json
from stages.rendering import model_key
from stages.training import AnchorData, PairData, config_key, train_expert

RENDER = Path("data/render")
BASE = Path("models/base")


def read_cache() -> tuple[Any, dict[str, torch.Tensor]]:
    """The render manifest and cache, checked to list the same pairs in the same order (read once per stage)."""
    manifest = read_table(RENDER / "manifest.parquet", ["pair_id", "categories"])
    cache = load_file(str(RENDER / "cache.safetensors"))
    with safe_open(str(RENDER / "cache.safetensors"), framework="pt") as f:
        order = json.loads(f.metadata()["pair_ids"])
    if order != list(manifest.pair_id):
        raise ValueError(f"{RENDER}/cache.safetensors: rows do not match manifest.parquet; re-run `dvc repro render`")
    return manifest, cache


def load_anchors(cached: tuple[Any, dict[str, torch.Tensor]] | None = None) -> AnchorData:
    """The safe side of every training pair (image and safe-prompt condition): the anchor term's rows.
    ``cached``: what ``read_cache()`` returned, if the caller has it already."""
    _, cache = cached or read_cache()
    cond = {k.removeprefix("cond_safe."): v for k, v in cache.items() if k.startswith("cond_safe.")}
    if not cond:
        raise ValueError(f"{RENDER}/cache.safetensors: no safe-prompt conditions (cond_safe.*), which "
                         "train.anchor_weight > 0 needs; re-run `dvc repro render`")
    return AnchorData(cache["x0_w"], cond)


def load_pairs(category: str, categories: tuple[str, ...],
               cached: tuple[Any, dict[str, torch.Tensor]] | None = None) -> PairData:
    """The cached pairs of ``category`` ('all': of every category in params); ``cached`` as in load_anchors."""
    manifest, cache = cached or read_cache()
    wanted = set(categories) if category == "all" else {category}
    rows = [i for i, cats in enumerate(manifest.categories) if wanted & set(cats)]
    if not rows:
        raise ValueError(f"category {category!r} has no training pairs in {RENDER}/manifest.parquet")
    idx = torch.tensor(rows)
    cond = {k.removeprefix("cond."): v for k, v in cache.items() if k.startswith("cond.")}
    return PairData(cache["x0_w"][idx], cache["x0_l"][idx], cond_index(cond, idx))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", required=True, help="a category from params.yaml, or 'all'")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.category != "all" and args.category not in params.categories:
        ap.error(f"--category {args.category!r}: not in params.yaml categories {list(params.categories)} nor 'all'")
    device = setup_runtime(params)
    cached = read_cache()
    data = load_pairs(args.category, params.categories, cached)
    fam = get_family(params.model.family).from_params(params, BASE, device)
    seed = params.seed * 1000 + (params.categories.index(args.category) + 1 if args.category != "all" else 0)
    key = config_key(params.train.model_dump(), args.category, seed,
                     model_key([RENDER / "cache.safetensors"] + sorted(f for f in BASE.iterdir() if f.is_file())))
    summary = train_expert(fam, data, params.train, seed, key, Path("checkpoints") / args.category,
                           Path("metrics/train") / f"{args.category}.csv", desc=f"train@{args.category}",
                           anchors=load_anchors(cached) if params.train.anchor_weight > 0 else None)
    t = params.train
    save_lora(Path("models/experts") / f"{args.category}.safetensors", fam.lora_state_dict(), t.rank, t.alpha,
              t.targets, category=args.category, pairs=len(data), train=json.dumps(t.model_dump(), sort_keys=True))
    write_json(Path("metrics/train") / f"{args.category}.json", {"pairs": len(data), **summary})
    print(f"train@{args.category}: {len(data)} pairs, last-20-step mean {summary}")


if __name__ == "__main__":
    sys.exit(main())
