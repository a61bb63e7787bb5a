"""Choose a baseline's knobs on the training split, never on the test prompts.

    python -m safealign.baselines.validate PARAMS OUT.json [--per-category N] [-S key=value ...]

Builds the method ``method`` of PARAMS (with the ``-S`` overrides, dotted keys as ``dvc exp run -S``) into a
temporary folder (nothing of the pipeline's is written), renders the first N training pairs of each category
(the render manifest, seeds shifted by ``SEED_SHIFT`` so the images are not the training renders) and scores
them with the configured detectors: IP per category on the unsafe prompts, fidelity on their safe twins (which
name no unsafe concept). Appends one JSON line {overrides, ip, ip_mean, fidelity, ...} to OUT.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from safealign.core.registry import Registry

SEED_SHIFT = 7_000_000
BENIGN_SEED = 8_000_000  # seeds of the validation benign prompts: row i renders from BENIGN_SEED + i

# The benign validation prompts, by the family's clean-prompt source (``sc_dpo.clean_source``): (params) -> list.
# The toy grammar's are worded in templates nothing else uses; a prompt file's are its prompts.
VALIDATION_SOURCES: Registry[Any] = Registry("validation prompt source")
VALIDATION_SOURCES.add_lazy("grammar", "safealign.toyworld.grammar:validation_prompts")
VALIDATION_SOURCES.add_lazy("file", "safealign.sc_dpo.clean:file_prompts")


def validation_set(params: Any, per_category: int) -> tuple[pd.DataFrame, list[int], pd.DataFrame]:
    """The first ``per_category`` training pairs of each category (the render manifest), their seeds shifted by
    ``SEED_SHIFT``, and their safe twins as a prompt table: (pairs, seeds, twins)."""
    from safealign.baselines.concepts import MANIFEST
    from safealign.core.io import read_table
    from safealign.core.paths import RENDER

    pairs = read_table(RENDER / MANIFEST, ("categories", "unsafe_prompt", "safe_prompt", "seed"))
    rows = sorted({i for c in params.categories
                   for i in [j for j, cats in enumerate(pairs.categories) if c in list(cats)][:per_category]})
    val = pairs.iloc[rows].reset_index(drop=True)
    return val, [int(s) + SEED_SHIFT for s in val.seed], pd.DataFrame({"prompt": val.safe_prompt})


def validation_benign(params: Any, n: int, source: str = "validation") -> pd.DataFrame:
    """``n`` benign validation prompts (columns prompt, seed), with every prompt equal to an evaluation prompt
    (test pairs' or benign) dropped, seeds from ``BENIGN_SEED``; the list is cycled when shorter than ``n``
    (each row its own seed). ``source``: ``validation`` (``VALIDATION_SOURCES``: for the toy grammar, benign
    captions worded in templates no training pair, pretraining or test prompt uses, as the test's benign
    prompts are worded in templates the experts never saw) or ``clean`` (``CLEAN_SOURCES``: the toy grammar's
    training templates). Fidelity on them is what the test's fidelity measures (benign prompts of every
    attribute value); the safe twins of the training pairs name only the values the experts were trained
    toward and overrate it, and so (on the toy world) do prompts in the training templates."""
    from safealign.core.io import read_table
    from safealign.core.paths import BENIGN, PAIRS
    from safealign.prompts.schema import evaluation_prompts, normalise
    from safealign.sc_dpo import CLEAN_SOURCES

    sources = {"validation": VALIDATION_SOURCES, "clean": CLEAN_SOURCES}[source]
    evaluation = evaluation_prompts(read_table(PAIRS, ("split", "unsafe_prompt", "safe_prompt")),
                                    read_table(BENIGN, ("prompt",)))
    prompts = [p for p in sources.get(params.sc_dpo.clean_source)(params) if normalise(p) not in evaluation]
    if not prompts:
        raise ValueError(f"sc_dpo.clean_source {params.sc_dpo.clean_source!r}: no benign validation prompt is left "
                         "after dropping the evaluation prompts")
    return pd.DataFrame({"prompt": [prompts[i % len(prompts)] for i in range(n)],
                         "seed": [BENIGN_SEED + i for i in range(n)]})


def main(argv: list[str] | None = None) -> None:
    from safealign.core.params import load_params, parse_overrides
    from safealign.core.paths import BASE
    from safealign.core.runtime import setup_runtime
    from safealign.evaluation.scoring import build_detectors, score
    from safealign.families import get_family
    from safealign.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params")
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-category", type=int, default=16)
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.overrides, "-S")
    params = load_params(args.params, overrides)
    device = setup_runtime(params)
    val, seeds, twins = validation_set(params, args.per_category)
    method = METHODS.get(params.method)()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        info = method.build(params, Path(tmp), device)
        build_s = time.time() - t0
        fam = get_family(params.model.family).from_params(params, BASE, device)
        method.attach(fam, Path(tmp), params)
        s = params.sampling
        images = fam.render(list(val.unsafe_prompt) + list(val.safe_prompt), seeds + seeds, s.steps, s.guidance,
                            s.batch_size, combine=method.combine)
    detectors, _ = build_detectors(params)
    metrics, _ = score(images[: len(val)], images[len(val):], val, twins, detectors, params.categories)
    record = {"method": params.method, "overrides": overrides, "pairs": len(val), "build_seconds": build_s,
              **{k: metrics.get(k) for k in ("ip", "ip_mean", "fidelity", "twin_rate", "benign_flagged")},
              "info": info}
    with args.out.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    print(f"{params.method} {overrides}: IP {metrics['ip_mean']:.3f} fidelity {metrics.get('fidelity')}")


if __name__ == "__main__":
    main()
