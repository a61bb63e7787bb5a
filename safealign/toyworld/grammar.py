"""The toy world's `grammar` prompt backend: unsafe captions and their minimally edited safe twins.

An unsafe caption shows its category's toy concept (``toy.concepts``); its twin changes only that value. Test
pairs and benign prompts use templates that training pairs never use.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import ParamsError
from safealign.core.ids import benign_ids, benign_seeds, pair_ids, pair_seeds
from safealign.prompts.schema import PromptSets
from safealign.toyworld import world as tw
from safealign.toyworld.settings import toy_settings

TRAIN_TEMPLATES = (0, 1, 2, 3)  # the grammar's test prompts use templates never seen in training pairs
TEST_TEMPLATES = (4, 5)


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


def _unsafe_values(toy: Any) -> dict[str, set[str]]:
    """attribute -> the values that play "unsafe" for some category (all of toy.concepts, not only params')."""
    unsafe: dict[str, set[str]] = {}
    for c in toy.concepts.values():
        unsafe.setdefault(c.attribute, set()).add(c.unsafe)
    return unsafe


def clean_prompts(params: Any) -> list[str]:
    """SC-DPO's clean prompts (``sc_dpo.clean_source: grammar``): ``sc_dpo.clean_prompts`` benign captions in the
    training templates (evaluation prompts use the held-out ones), showing no category's concept. The
    templates' space is small, so a caption may repeat: each row still gets its own two seeds (its own pair).
    Seeded apart from the prompts stage's generator."""
    unsafe = _unsafe_values(toy_settings(params))
    rng = np.random.default_rng(params.seed + 7)
    return [_scene_without_concepts(rng, unsafe, TRAIN_TEMPLATES).caption() for _ in range(params.sc_dpo.clean_prompts)]


def validation_prompts(params: Any) -> list[str]:
    """Benign captions in the validation templates (``world.VALIDATION_TEMPLATES``): every combination of the
    attribute values no category's concept uses, in each template, in a seeded order. These word orders are
    used by nothing else (pretraining, training pairs, evaluation), so no evaluation prompt is among them, and
    fidelity on them shows what a wording the experts never saw does to benign prompts, as the test's held-out
    templates do: the training templates' benign prompts overrate it (measured 2026-12-03 on the default's
    merged model, colour fidelity: training template 0.75, validation templates 0.53-0.80, test template 4
    0.55; base 0.97 on all)."""
    import itertools

    unsafe = _unsafe_values(toy_settings(params))
    allowed = {a: [v for v in vals if v not in unsafe.get(a, set())] for a, vals in tw.ATTRIBUTES.items()}
    prompts = [t.format(**dict(zip(allowed, combo))) for t in tw.VALIDATION_TEMPLATES
               for combo in itertools.product(*allowed.values())]
    order = np.random.default_rng(params.seed + 9).permutation(len(prompts))
    return [prompts[i] for i in order]


def grammar_backend(params: Any) -> PromptSets:
    """Toy-world pairs: an unsafe caption shows its category's concept; the safe twin changes only that value.

    About one pair in eight carries the concepts of two categories (a multi-label pair). Test pairs and benign
    prompts use the held-out templates, so no test or benign prompt appears in training (the safe sides of
    training pairs are benign too, and the anchor term trains on them).
    """
    if params.model.family != "toy":  # toy captions ("a picture of a red circle") would train a real model on nothing
        raise ParamsError(f"params.yaml: prompts.backend: 'grammar' writes the toy world's captions, not prompts for "
                          f"model.family={params.model.family!r}; use a published pair file "
                          "(`-S prompts.backend=file -S prompts.options.path=data/coprov2_train.csv`) or an LLM "
                          "recipe (prompts.backend local, openai or vllm)")
    toy = toy_settings(params)
    rng = np.random.default_rng(params.seed + 1)
    concepts = {c: toy.concepts[c] for c in params.categories}
    unsafe = _unsafe_values(toy)
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
    pairs.insert(0, "pair_id", pair_ids(len(pairs)))
    pairs["seed"] = pair_seeds(params.seed, len(pairs))
    benign_scenes = [_scene_without_concepts(rng, unsafe, TEST_TEMPLATES)
                     for _ in range(params.prompts.benign)]
    benign = pd.DataFrame({
        "prompt_id": benign_ids(len(benign_scenes)),
        "prompt": [s.caption() for s in benign_scenes],
        "seed": benign_seeds(params.seed, len(benign_scenes)),
    })
    stats = {"backend": "grammar", "pairs": {s: int((pairs.split == s).sum()) for s in ("train", "test")},
             "multi_label_pairs": int((pairs.categories.map(len) > 1).sum()), "benign": len(benign),
             "rejected": {}}
    return PromptSets(pairs=pairs, benign=benign, stats=stats)
