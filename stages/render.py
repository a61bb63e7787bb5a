"""Stage `render`: the base model renders both prompts of every training pair from the pair's seed.

    python -m stages.render     # -> data/render/{images/*.png, manifest.parquet, cache.safetensors}
    accelerate launch --num_processes 2 -m stages.render   # the same files: each process renders every 2nd batch

dvc.yaml runs it through ``runtime.launcher`` (default ``python``; docs/scaling.md).

Resumes after an interruption without redoing finished batches (``safealign.families.rendering``). The cache
holds what training needs, encoded once (``safealign.training.data``), so training never re-encodes an image or
a prompt.
"""
from __future__ import annotations

import json
import sys

import numpy as np
from safetensors.torch import save_file

from safealign.core.cli import run
from safealign.core.hashing import files_key
from safealign.core.io import atomic_path, read_table, write_table
from safealign.core.params import load_params
from safealign.core.paths import BASE, PAIRS, RENDER, base_files
from safealign.core.runtime import process_shard, setup_runtime
from safealign.families import get_family
from safealign.families.rendering import encode_cache, render_to_folder
from safealign.prompts.schema import PAIR_COLUMNS


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    pairs = read_table(PAIRS, PAIR_COLUMNS)
    train = pairs[pairs.split == "train"].reset_index(drop=True)
    if train.empty:
        raise ValueError(f"{PAIRS}: no training pairs (split == 'train')")
    fam = get_family(params.model.family).from_params(params, BASE, device)
    s = params.sampling
    names = [f"{p}_{side}" for p in train.pair_id for side in ("u", "s")]
    prompts = [x for u, sp in zip(train.unsafe_prompt, train.safe_prompt) for x in (u, sp)]
    seeds = [int(x) for x in np.repeat(train.seed.to_numpy(), 2)]
    key = files_key(base_files(), extra=params.model.model_dump())
    images = render_to_folder(fam, prompts, seeds, names, RENDER / "images", s.steps, s.guidance, s.batch_size, key)
    rank, world, _ = process_shard(device)
    if rank > 0:  # launched as several processes (runtime.launcher): each rendered its share, one writes
        return
    manifest = train.assign(unsafe_image=[f"images/{p}_u.png" for p in train.pair_id],
                            safe_image=[f"images/{p}_s.png" for p in train.pair_id])
    cache = encode_cache(fam, manifest, images[0::2], images[1::2], s.batch_size)
    with atomic_path(RENDER / "cache.safetensors") as tmp:
        save_file(cache, str(tmp), metadata={"pair_ids": json.dumps(list(manifest.pair_id))})
    write_table(RENDER / "manifest.parquet", manifest)
    print(f"render: {len(manifest)} pairs -> {RENDER}, {world} process(es)")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
