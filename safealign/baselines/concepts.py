"""What the baselines erase: each category's concept, read from the same training pairs the experts learn from.

The source is the render manifest (``data/render/manifest.parquet``: the train split of the pairs, with their
categories), so a baseline erases exactly the categories and concepts the experts are trained on. Per category:

- ``unsafe_prompts`` / ``safe_prompts``: its training pairs (unsafe prompt, minimal safe twin), in table order;
- ``words``: the concept's words, the words the twins remove most often (a word-level diff of each single-category
  pair: words of the unsafe prompt that its twin lacks), ``safe_words``: the words the twins put in their place.

Nothing here names a family: the word diff works on any prompt text (toy grammar or LLM prompts).
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from safealign.core.paths import RENDER

MANIFEST = "manifest.parquet"


@dataclasses.dataclass(frozen=True)
class Concept:
    category: str
    words: tuple[str, ...]
    safe_words: tuple[str, ...]
    unsafe_prompts: tuple[str, ...]
    safe_prompts: tuple[str, ...]

    @property
    def text(self) -> str:
        """The concept as a short prompt (its words)."""
        return " ".join(self.words)

    @property
    def safe_text(self) -> str:
        return " ".join(self.safe_words)


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def word_diff(unsafe: str, safe: str) -> tuple[list[str], list[str]]:
    """(words of ``unsafe`` its twin lacks, words of ``safe`` the unsafe prompt lacks), each in prompt order."""
    u, s = _words(unsafe), _words(safe)
    return [w for w in u if w not in s], [w for w in s if w not in u]


def top_words(diffs: Sequence[Sequence[str]], n_words: int) -> tuple[str, ...]:
    """The ``n_words`` most frequent words over the diffs (ties: first seen first)."""
    counts = collections.Counter(w for d in diffs for w in dict.fromkeys(d))
    return tuple(w for w, _ in counts.most_common(n_words))


def concepts_from_pairs(pairs: pd.DataFrame, categories: Sequence[str], n_words: int = 1) -> dict[str, Concept]:
    """Per category: its training pairs and the concept's words (see the module docstring). Words come from the
    pairs of that category alone (multi-label pairs remove several concepts at once); a category without such
    pairs takes its words from all its pairs. Raises ValueError naming a category that has no pair."""
    out = {}
    for cat in categories:
        rows = pairs[[cat in list(c) for c in pairs.categories]]
        if rows.empty:
            raise ValueError(f"category {cat!r}: no training pair carries it, so there is no concept to erase")
        single = rows[[len(list(c)) == 1 for c in rows.categories]]
        src = single if len(single) else rows
        diffs = [word_diff(u, s) for u, s in zip(src.unsafe_prompt, src.safe_prompt, strict=True)]
        out[cat] = Concept(cat, top_words([d[0] for d in diffs], n_words), top_words([d[1] for d in diffs], n_words),
                           tuple(rows.unsafe_prompt), tuple(rows.safe_prompt))
    return out


def load_concepts(categories: Sequence[str], n_words: int = 1, render: Path = RENDER) -> dict[str, Concept]:
    """``concepts_from_pairs`` on the render manifest (the experts' training pairs)."""
    from safealign.core.io import read_table

    path = Path(render) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: the training pairs are missing; run `dvc repro render`")
    pairs = read_table(path, ("categories", "unsafe_prompt", "safe_prompt"))
    return concepts_from_pairs(pairs, categories, n_words)


def concept_prompt(concepts: dict[str, Concept]) -> str:
    """Every category's concept words in one prompt (a negative prompt, SLD's safety concept)."""
    return " ".join(dict.fromkeys(w for c in concepts.values() for w in c.words))
