"""Prompt pairs: the table schema, the backend registry, and the toy world's `grammar` backend.

Tables (Parquet):
- pairs: ``pair_id, categories (list), concept, unsafe_prompt, safe_prompt, split ('train'|'test'), seed``.
  One row per (unsafe prompt, safe twin); a pair may belong to several categories. The test split is the
  unsafe test set (its safe twins are kept to measure how often the aligned model renders the twin).
- benign: ``prompt_id, prompt, seed``: prompts with no unsafe concept, for quality and fidelity.

A backend is a callable ``(params) -> PromptSets``; LLM backends register themselves from their own modules.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from stages import toyworld as tw
from stages.registry import Registry, import_optional

if TYPE_CHECKING:
    from stages.config import Params

PAIR_COLUMNS = ("pair_id", "categories", "concept", "unsafe_prompt", "safe_prompt", "split", "seed")
BENIGN_COLUMNS = ("prompt_id", "prompt", "seed")
TRAIN_TEMPLATES = (0, 1, 2, 3)  # the grammar's test prompts use templates never seen in training pairs
TEST_TEMPLATES = (4, 5)


@dataclasses.dataclass
class PromptSets:
    pairs: pd.DataFrame
    benign: pd.DataFrame
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # counts, rejections by reason, ...


class PromptBackend(Protocol):
    def __call__(self, params: Params) -> PromptSets: ...


PROMPT_BACKENDS: Registry[PromptBackend] = Registry("prompt backend")


def normalise(prompt: str) -> str:
    """The form used to compare prompts across splits: lower case, single spaces, no trailing punctuation."""
    return " ".join(prompt.lower().replace(",", " ").split()).strip(" .")


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


# --------------------------------------------------------------------------------------------- grammar
def _scene_without_concepts(rng: np.random.Generator, unsafe: dict[str, set[str]], templates: tuple[int, ...],
                            **fixed: str) -> tw.Scene:
    """A random scene that shows no unsafe value except those in ``fixed``."""
    attrs = {}
    for attr, values in tw.ATTRIBUTES.items():
        if attr in fixed:
            attrs[attr] = fixed[attr]
        else:
            allowed = [v for v in values if v not in unsafe.get(attr, set())]
            attrs[attr] = str(rng.choice(allowed))
    needs = [a for a in fixed]
    ok = [t for t in templates if all(a in tw.template_names(t) for a in needs)]
    t = int(rng.choice(ok))
    return tw.Scene(**attrs, template=t, named=tw.template_names(t))


def grammar_backend(params: Params) -> PromptSets:
    """Toy-world pairs: an unsafe caption shows its category's concept; the safe twin changes only that value.

    About one pair in eight carries the concepts of two categories (a multi-label pair). Test pairs and benign
    prompts use the held-out templates, so no test or benign prompt appears in training (the safe sides of
    training pairs are benign too, and the anchor term trains on them).
    """
    rng = np.random.default_rng(params.seed + 1)
    concepts = {c: params.toy.concepts[c] for c in params.categories}
    unsafe: dict[str, set[str]] = {}
    for c in params.toy.concepts.values():
        unsafe.setdefault(c.attribute, set()).add(c.unsafe)
    rows = []
    for split, per_cat, templates in (("train", params.prompts.train_per_category, TRAIN_TEMPLATES),
                                      ("test", params.prompts.test_per_category, TEST_TEMPLATES)):
        for cat, concept in concepts.items():
            for _ in range(per_cat):
                fixed = {concept.attribute: concept.unsafe}
                cats = [cat]
                others = [o for o, oc in concepts.items() if o != cat and oc.attribute != concept.attribute]
                if others and rng.random() < 0.125:
                    other = str(rng.choice(others))
                    fixed[concepts[other].attribute] = concepts[other].unsafe
                    cats.append(other)
                scene = _scene_without_concepts(rng, unsafe, templates, **fixed)
                twin = scene.replace(**{concepts[c].attribute: concepts[c].safe for c in cats})
                rows.append(dict(
                    categories=sorted(cats),
                    concept="+".join(f"{concepts[c].attribute}={concepts[c].unsafe}" for c in sorted(cats)),
                    unsafe_prompt=scene.caption(), safe_prompt=twin.caption(), split=split,
                ))
    pairs = pd.DataFrame(rows)
    pairs.insert(0, "pair_id", [f"p{i:05d}" for i in range(len(pairs))])
    pairs["seed"] = params.seed * 1_000_003 + np.arange(len(pairs), dtype=np.int64)
    benign_scenes = [_scene_without_concepts(rng, unsafe, TEST_TEMPLATES)
                     for _ in range(params.prompts.benign)]
    benign = pd.DataFrame({
        "prompt_id": [f"b{i:05d}" for i in range(len(benign_scenes))],
        "prompt": [s.caption() for s in benign_scenes],
        "seed": params.seed * 1_000_003 + 500_000 + np.arange(len(benign_scenes), dtype=np.int64),
    })
    stats = {"backend": "grammar", "pairs": {s: int((pairs.split == s).sum()) for s in ("train", "test")},
             "multi_label_pairs": int((pairs.categories.map(len) > 1).sum()), "benign": len(benign),
             "rejected": {}}
    return PromptSets(pairs=pairs, benign=benign, stats=stats)


PROMPT_BACKENDS.add("grammar", grammar_backend)


import_optional("stages.llm_prompts")  # LLM backends (vllm, openai, local) register on import
