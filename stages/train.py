"""Stage `train@<category>` (and `train_all`): one LoRA safety expert trained with a preference loss.

Preferred = the safe image, rejected = the unsafe image, condition = the unsafe prompt. `--category all`
trains on every category's pairs (the paper's "All-single" baseline). Loss and extra terms: ``train.loss``,
``train.sft_weight``, ``train.anchor_weight`` (``safealign.training``).

    python -m stages.train --category violence    # -> models/experts/violence.safetensors, metrics/train/violence.csv
    accelerate launch --cpu --num_processes 2 -m stages.train --category violence   # the same, data-parallel

dvc.yaml runs it through ``runtime.launcher`` (default ``python``; docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from safealign.core.cli import run
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import EXPERTS, METRICS
from safealign.training.unused import all_single_unused, write_unused_expert


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", required=True, help="a category from params.yaml, or 'all'")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.category != "all" and args.category not in params.categories:
        ap.error(f"--category {args.category!r}: not in params.yaml categories {list(params.categories)} nor 'all'")
    if args.category == "all" and (reason := all_single_unused(params)):
        if os.environ.get("RANK", "0") == "0":  # launched as several processes (runtime.launcher): one writes
            write_unused_expert(EXPERTS / "all.safetensors", METRICS / "train", "all", reason)
            print(f"train@all: not trained ({reason})")
        return
    # the heavy imports (torch, diffusers, peft) only for a stage that trains
    from accelerate import PartialState

    from safealign.core.hashing import files_key, json_key
    from safealign.core.ids import expert_seed
    from safealign.core.paths import BASE, CHECKPOINTS, RENDER, base_files
    from safealign.core.runtime import setup_runtime
    from safealign.families import get_family
    from safealign.families.lora import save_lora
    from safealign.training.data import ROW_SOURCES, load_pairs, read_cache
    from safealign.training.loop import train_expert
    from safealign.training.terms import active_terms

    device = setup_runtime(params)
    cached = read_cache()
    data = load_pairs(args.category, params.categories, cached)
    fam = get_family(params.model.family).from_params(params, BASE, device)
    t = params.train
    seed = expert_seed(params.seed, args.category, params.categories)
    key = json_key(t.model_dump(), args.category, seed, files_key([RENDER / "cache.safetensors"] + base_files()))
    rows = {term.rows_from: ROW_SOURCES[term.rows_from](cached) for term in active_terms(t) if term.rows_from}
    summary = train_expert(fam, data, t, seed, key, CHECKPOINTS / args.category,
                           METRICS / "train" / f"{args.category}.csv", desc=f"train@{args.category}", rows=rows)
    state = PartialState()
    if not state.is_main_process:  # launched as several processes (runtime.launcher): one writes
        return
    save_lora(EXPERTS / f"{args.category}.safetensors", fam.lora_state_dict(), t.rank, t.alpha,
              t.targets, category=args.category, pairs=len(data), train=json.dumps(t.model_dump(), sort_keys=True))
    write_json(METRICS / "train" / f"{args.category}.json", {"pairs": len(data), **summary})
    print(f"train@{args.category}: {len(data)} pairs, {state.num_processes} process(es), last-20-step mean {summary}")


if __name__ == "__main__":
    sys.exit(run(main))
