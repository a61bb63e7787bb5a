"""SC-DPO's clean-prompt preference pairs: two images of one benign prompt, the better one preferred.

The paper trains on pairs from harmful *and* clean prompts so that quality on clean prompts holds (their
SCP-10K). Here (our reading; the released data is not public):

- **prompts** from ``safealign.sc_dpo.CLEAN_SOURCES`` (``sc_dpo.clean_source``): ``grammar`` (the toy grammar's
  benign captions in the training templates, so never an evaluation prompt) or ``file`` (a CSV/Parquet of benign
  prompts, ``sc_dpo.clean_path``, column ``prompt`` or ``caption``); any prompt equal to an evaluation prompt
  (test pairs, benign set) is dropped and counted;
- **images**: the base model renders each prompt from two seeds (``safealign.core.ids.clean_seeds``);
- **preference** from ``safealign.sc_dpo.PREFERENCE`` (``sc_dpo.clean_preference``): ``prompt_match``, the share of
  what the prompt names that the image shows, by a configured detector that declares the ``prompt_match``
  capability (the toy's exact judge); ties (equal scores) are dropped;
- **mixing**: ``mix_count`` clean pairs join the harmful ones so that they are ``sc_dpo.clean_share`` of the
  training set (drawn with replacement if there are fewer; the loop samples uniformly).

The `clean` stage (``stages/clean.py``) writes ``CLEAN``: PNGs, ``manifest.parquet`` and ``cache.safetensors`` in
the render cache's layout (``x0_w`` preferred, ``x0_l`` rejected, ``cond.*`` the prompt).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import UserError
from safealign.core.io import read_table
from safealign.sc_dpo import CLEAN, MANIFEST_COLUMNS, UNUSED_KEY
from safealign.training.data import PairData


def preference_pairs(score_a: np.ndarray, score_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, from the scores of its two images: (kept, a_preferred), both bool (N,). A tie (equal scores,
    or a score that is nan) is not kept: neither image is better."""
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    kept = np.isfinite(a) & np.isfinite(b) & (a != b)
    return kept, kept & (a > b)


def mix_count(n_harmful: int, share: float) -> int:
    """How many clean pairs make ``share`` of a training set that holds ``n_harmful`` harmful pairs."""
    if not 0 <= share < 1:
        raise ValueError(f"clean share must be in [0, 1), got {share}")
    return round(share / (1 - share) * n_harmful)


def mix_rows(n_harmful: int, n_clean: int, share: float, seed: int) -> np.ndarray:
    """The clean rows (indices into the clean pairs) that join ``n_harmful`` harmful pairs: ``mix_count`` of
    them, each clean pair once before any repeats (a seeded permutation, tiled)."""
    k = mix_count(n_harmful, share)
    if k == 0:
        return np.zeros(0, np.int64)
    if n_clean == 0:
        raise UserError(f"sc_dpo.clean_share = {share} but {CLEAN} holds no clean pairs (every prompt's two images "
                        "tied); raise sc_dpo.clean_prompts or set clean_share: 0")
    perm = np.random.default_rng(seed).permutation(n_clean)
    return np.tile(perm, -(-k // n_clean))[:k]


def read_clean(folder: Path = CLEAN) -> tuple[pd.DataFrame, PairData | None]:
    """The clean stage's manifest and its cached pairs (checked to be in the same order); None if it has none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    manifest = read_table(Path(folder) / "manifest.parquet", MANIFEST_COLUMNS)
    path = Path(folder) / "cache.safetensors"
    if manifest.empty:
        with safe_open(str(path), framework="pt") as f:
            unused = (f.metadata() or {}).get(UNUSED_KEY)
        if unused:
            raise UserError(f"{path}: the clean pairs were not built ({unused}); run `dvc repro clean` under the "
                            "present params (dvc repro does it)")
        return manifest, None
    cache = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        order = json.loads(f.metadata()["pair_ids"])
    if order != list(manifest.pair_id):
        raise ValueError(f"{path}: rows do not match manifest.parquet; re-run `dvc repro clean`")
    cond = {k.removeprefix("cond."): v for k, v in cache.items() if k.startswith("cond.")}
    return manifest, PairData(cache["x0_w"], cache["x0_l"], cond)


def file_prompts(params: Any) -> list[str]:
    """``sc_dpo.clean_path``: benign prompts from a CSV or Parquet file (column ``prompt``, else ``caption``)."""
    path = Path(params.sc_dpo.clean_path)
    if not params.sc_dpo.clean_path or not path.exists():
        raise UserError(f"sc_dpo.clean_path: {str(path)!r} is not a file; sc_dpo.clean_source 'file' reads benign "
                        "prompts from a CSV or Parquet file with a 'prompt' (or 'caption') column")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    column = next((c for c in ("prompt", "caption") if c in table.columns), None)
    if column is None:
        raise UserError(f"{path}: no 'prompt' or 'caption' column (columns: {list(table.columns)})")
    prompts = [str(p).strip() for p in table[column]]
    for i, p in enumerate(prompts, start=1):
        if not p or p == "nan":
            raise UserError(f"{path}: row {i}: empty prompt in column {column!r}")
    return prompts[: params.sc_dpo.clean_prompts]


class PromptMatch:
    """``prompt_match``: score = share of what the prompt names that the image shows, by the first configured
    detector (``evaluate.detectors``) declaring the ``prompt_match`` capability."""

    def __init__(self, params: Any) -> None:
        from safealign.evaluation.detectors import PROMPT_MATCH, with_capability
        from safealign.evaluation.scoring import build_detectors

        detectors, _ = build_detectors(params)
        self.judge = with_capability(detectors, PROMPT_MATCH)
        if self.judge is None:
            raise UserError(f"sc_dpo.clean_preference 'prompt_match': none of evaluate.detectors "
                            f"{list(params.evaluate.detectors)} can score prompt match; set sc_dpo.clean_share: 0 "
                            "or add a preference scorer to safealign.sc_dpo.clean.PREFERENCE")

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return self.judge.prompt_match(images, prompts)

    def protocol(self) -> dict[str, Any]:
        return {"preference": "prompt_match", "judge": self.judge.protocol()}
