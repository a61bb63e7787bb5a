"""Stage `clean`: SC-DPO's clean-prompt preference pairs (``safealign.sc_dpo.clean``).

    python -m stages.clean    # -> data/clean/{images/*.png, manifest.parquet, cache.safetensors}, metrics/clean.json

Benign prompts from ``sc_dpo.clean_source`` (never an evaluation prompt: equal ones are dropped and counted),
each rendered by the base model from two seeds; the image that better shows its prompt (``sc_dpo.clean_preference``)
is preferred, ties dropped. The pairs are cached like the render stage's, for ``method: sc_dpo`` to mix in at
``sc_dpo.clean_share``. A source or preference scorer the configured family or detectors cannot serve (the
toy's judge under an SD family) leaves the set empty with the reason in the metrics; ``sc_dpo`` with a clean
share then refuses. Resumes after an interruption (``safealign.families.rendering``).

Only ``method: sc_dpo`` with ``sc_dpo.clean_share`` > 0 reads the pairs; under any other setting the stage
renders nothing and writes an empty set whose cache and metrics name why (``safealign.sc_dpo.clean_unused``),
in about a second: the default SafetyDPO run skips 448 renders. ``dvc exp run -S method=sc_dpo`` re-runs it
(its params include both keys) and renders them.
"""
from __future__ import annotations

import json
import sys

import pandas as pd

from safealign.core.cli import run
from safealign.core.io import atomic_path, safetensors_bytes, write_json, write_table
from safealign.core.params import load_params
from safealign.core.paths import METRICS
from safealign.sc_dpo import CLEAN, MANIFEST_COLUMNS, UNUSED_KEY, clean_unused


def write_set(manifest: pd.DataFrame, cache: dict, info: dict, unused: str | None = None) -> None:
    metadata = {"pair_ids": json.dumps(list(manifest.pair_id)), **({UNUSED_KEY: unused} if unused else {})}
    with atomic_path(CLEAN / "cache.safetensors") as tmp:
        tmp.write_bytes(safetensors_bytes(cache, metadata))  # no tensors (the unused set): written without torch
    write_table(CLEAN / "manifest.parquet", manifest)
    write_json(METRICS / "clean.json", info)


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({k: [] for k in MANIFEST_COLUMNS})


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    c, s = params.sc_dpo, params.sampling
    CLEAN.mkdir(parents=True, exist_ok=True)
    if reason := clean_unused(params):  # nothing reads the pairs: an empty set naming why, no rendering
        write_set(empty_manifest(), {}, {"pairs": 0, "unused": reason}, unused=reason)
        print(f"clean: not built ({reason})")
        return
    # the heavy imports (torch, diffusers) only for a stage that renders
    import numpy as np

    from safealign.core.errors import UserError
    from safealign.core.hashing import files_key
    from safealign.core.ids import clean_ids, clean_seeds
    from safealign.core.io import read_table
    from safealign.core.paths import BASE, BENIGN, PAIRS, base_files
    from safealign.core.runtime import setup_runtime
    from safealign.families import get_family
    from safealign.families.rendering import encode_cache, render_to_folder
    from safealign.prompts.schema import BENIGN_COLUMNS, PAIR_COLUMNS, evaluation_prompts, normalise
    from safealign.sc_dpo import CLEAN_SOURCES, PREFERENCE
    from safealign.sc_dpo.clean import preference_pairs

    device = setup_runtime(params)
    try:
        scorer = PREFERENCE.get(c.clean_preference)(params)
        prompts = CLEAN_SOURCES.get(c.clean_source)(params)
    except UserError as e:
        print(f"clean: no clean pairs: {e}", file=sys.stderr)
        write_set(empty_manifest(), {}, {"pairs": 0, "unavailable": str(e)})
        return
    evaluation = evaluation_prompts(read_table(PAIRS, PAIR_COLUMNS), read_table(BENIGN, BENIGN_COLUMNS))
    leaked = [p for p in prompts if normalise(p) in evaluation]
    prompts = [p for p in prompts if normalise(p) not in evaluation]
    ids, seeds = clean_ids(len(prompts)), clean_seeds(params.seed, len(prompts))
    fam = get_family(params.model.family).from_params(params, BASE, device)
    key = files_key(base_files(), extra=params.model.model_dump())
    names = [f"{i}_{side}" for i in ids for side in ("a", "b")]
    images = render_to_folder(fam, [p for p in prompts for _ in (0, 1)], [int(x) for x in seeds.reshape(-1)], names,
                              CLEAN / "images", s.steps, s.guidance, s.batch_size, key, desc="clean")
    score_a, score_b = scorer(images[0::2], prompts), scorer(images[1::2], prompts)
    kept, a_wins = preference_pairs(score_a, score_b)
    w = np.where(a_wins, 0, 1)  # which of the two images is preferred
    rows = np.flatnonzero(kept)
    pick = lambda arr, side: np.array([arr[i, side[j]] for j, i in enumerate(rows)])
    both = np.stack([score_a, score_b], 1)
    manifest = pd.DataFrame({
        "pair_id": [ids[i] for i in rows], "prompt": [prompts[i] for i in rows],
        "seed_w": pick(seeds, w[rows]), "seed_l": pick(seeds, 1 - w[rows]),
        "score_w": pick(both, w[rows]), "score_l": pick(both, 1 - w[rows]),
        "image_w": [f"images/{ids[i]}_{'ab'[w[i]]}.png" for i in rows],
        "image_l": [f"images/{ids[i]}_{'ab'[1 - w[i]]}.png" for i in rows],
    })
    img = images.reshape(len(prompts), 2, *images.shape[1:]) if len(prompts) else images
    images_w = np.stack([img[i, w[i]] for i in rows]) if len(rows) else images[:0]
    images_l = np.stack([img[i, 1 - w[i]] for i in rows]) if len(rows) else images[:0]
    as_pairs = pd.DataFrame({"unsafe_prompt": manifest.prompt, "safe_prompt": manifest.prompt})
    cache = encode_cache(fam, as_pairs, images_l, images_w, s.batch_size) if len(rows) else {}
    cache = {k: v for k, v in cache.items() if not k.startswith("cond_safe.")}  # one prompt: cond.* is enough
    info = {"prompts": len(prompts), "pairs": len(rows), "ties": int(len(prompts) - len(rows)),
            "dropped_as_evaluation_prompts": len(leaked),
            "score_w_mean": float(manifest.score_w.mean()) if len(rows) else None,
            "score_l_mean": float(manifest.score_l.mean()) if len(rows) else None,
            "preference": scorer.protocol(), "source": c.clean_source}
    write_set(manifest, cache, info)
    print(f"clean: {len(rows)} pairs of {len(prompts)} prompts ({info['ties']} ties dropped) -> {CLEAN}")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
