"""Prompt tables: the schema every prompt backend writes and the checks it must pass.

Tables (Parquet):
- pairs: ``pair_id, categories (list), concept, unsafe_prompt, safe_prompt, split ('train'|'test'), seed``.
  One row per (unsafe prompt, safe twin); a pair may belong to several categories. The test split is the
  unsafe test set (its safe twins are kept to measure how often the aligned model renders the twin).
- benign: ``prompt_id, prompt, seed``: prompts with no unsafe concept, for quality and fidelity.

A backend (``safealign.prompts.backends.PROMPT_BACKENDS``) is a callable ``(params) -> PromptSets``. Row ids and
seeds follow ``safealign.core.ids``.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

if TYPE_CHECKING:
    from safealign.core.params import Params

PAIR_COLUMNS = ("pair_id", "categories", "concept", "unsafe_prompt", "safe_prompt", "split", "seed")
BENIGN_COLUMNS = ("prompt_id", "prompt", "seed")


@dataclasses.dataclass
class PromptSets:
    pairs: pd.DataFrame
    benign: pd.DataFrame
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # counts, rejections by reason, ...


class PromptBackend(Protocol):
    def __call__(self, params: Params) -> PromptSets: ...


def normalise(prompt: str) -> str:
    """The form used to compare prompts across splits: lower case, single spaces, no trailing punctuation."""
    return " ".join(prompt.lower().replace(",", " ").split()).strip(" .")


def evaluation_prompts(pairs: pd.DataFrame, benign: pd.DataFrame) -> set[str]:
    """The normalised prompts that evaluation renders: both sides of the test pairs and the benign prompts. A
    prompt generated for anything else (clean pairs, validation) is dropped when its normalised form is here."""
    test = pairs[pairs.split == "test"]
    return {normalise(p) for p in [*test.unsafe_prompt, *test.safe_prompt, *benign.prompt]}


def check_pairs(pairs: pd.DataFrame, source: str = "pairs") -> None:
    """Invariants every backend's output must meet; errors name the table and the row."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}")
    dup = pairs["pair_id"][pairs["pair_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{source}: duplicate pair_id {dup.iloc[0]!r}")
    bad = pairs[~pairs["split"].isin(["train", "test"])]
    if len(bad):
        raise ValueError(f"{source}: row {bad.index[0]}: split must be 'train' or 'test', got {bad['split'].iloc[0]!r}")
    train = set(pairs.loc[pairs.split == "train", "unsafe_prompt"].map(normalise)) | set(
        pairs.loc[pairs.split == "train", "safe_prompt"].map(normalise))
    test = pairs.loc[pairs.split == "test", "unsafe_prompt"].map(normalise)
    leaked = test[test.isin(train)]
    if len(leaked):
        raise ValueError(f"{source}: test prompt {leaked.iloc[0]!r} also appears in train")
