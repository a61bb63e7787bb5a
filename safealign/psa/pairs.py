"""Per-user preference pairs from the render cache, by PSAlign's pair rule.

Pair rule (``preferred_side``): for a render pair of category c and a user, under a caption,
- c banned by the user -> the safe image is preferred, whichever caption;
- c allowed -> the image that matches the caption is preferred (unsafe caption: the unsafe image; safe caption:
  the safe image);
- neither (a Sage user may leave a category out of both lists) -> no pair.
Every pair appears under the unsafe and the safe caption. Each seen user gets ``pairs_per_user`` render pairs,
drawn without replacement from a generator seeded by the seed and the user's row.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safealign.psa.branch import USER_KEY
from safealign.training.data import PairData


def preferred_side(category: str, banned: Sequence[str], allowed: Sequence[str], caption: str) -> str | None:
    """'safe' or 'unsafe' (the preferred image), or None; ``caption``: 'unsafe' or 'safe'."""
    if caption not in ("unsafe", "safe"):
        raise ValueError(f"caption must be 'unsafe' or 'safe', got {caption!r}")
    if category in banned:
        return "safe"
    if category in allowed:
        return caption
    return None


def first_categories(pair_categories: Sequence[Sequence[str]], categories: Sequence[str]) -> list[str | None]:
    """The category each render pair counts under: its first one in ``categories`` (None: none of them)."""
    return [next((c for c in cats if c in categories), None) for cats in pair_categories]


def pair_plan(users: Any, pair_categories: Sequence[Sequence[str]], categories: Sequence[str], per_user: int,
              seed: int, captions: Sequence[str] = ("unsafe", "safe")) -> list[tuple[int, int, str, str]]:
    """(user row, render pair row, caption, preferred side) for every per-user pair. ``users``: the users table
    (rows in order); ``pair_categories``: each render pair's categories; a pair counts under its first category
    in ``categories``; ``captions``: under which captions each drawn pair appears (both: the release)."""
    first = first_categories(pair_categories, categories)
    eligible = [i for i, c in enumerate(first) if c is not None]
    plan = []
    for u, (banned, allowed) in enumerate(zip(users.banned, users.allowed)):
        rng = np.random.default_rng([seed, 16, u])
        picked = rng.choice(eligible, size=min(per_user, len(eligible)), replace=False)
        for i in sorted(int(x) for x in picked):
            for caption in captions:
                side = preferred_side(first[i], list(banned), list(allowed), caption)
                if side is not None:
                    plan.append((u, i, caption, side))
    return plan


def user_pairs(plan: Sequence[tuple[int, int, str, str]], cache: dict[str, torch.Tensor],
               user_vectors: torch.Tensor) -> PairData:
    """The plan's pairs as training data: x0_w / x0_l by the preferred side, the caption's text condition, and
    the user's vector under ``xattn.user``. ``cache``: the render cache (``x0_w`` safe, ``x0_l`` unsafe images,
    ``cond.*`` unsafe and ``cond_safe.*`` safe captions); ``user_vectors``: (U, D) in the users' row order."""
    if not plan:
        raise ValueError("no per-user pairs: no seen user bans or allows a category of the training pairs")
    u = torch.tensor([p[0] for p in plan])
    i = torch.tensor([p[1] for p in plan])
    safe_caption = torch.tensor([p[2] == "safe" for p in plan])
    safe_preferred = torch.tensor([p[3] == "safe" for p in plan]).view(-1, 1, 1, 1)
    img_s, img_u = cache["x0_w"][i], cache["x0_l"][i]
    cond = {}
    for key in (k.removeprefix("cond.") for k in cache if k.startswith("cond.")):
        a, b = cache["cond." + key][i], cache["cond_safe." + key][i]
        cond[key] = torch.where(safe_caption.view(-1, *[1] * (a.dim() - 1)), b, a)
    cond["xattn." + USER_KEY] = user_vectors[u].float()
    return PairData(torch.where(safe_preferred, img_s, img_u), torch.where(safe_preferred, img_u, img_s), cond)


def twin_plan(plan: Sequence[tuple[int, int, str, str]], users: Any, pair_categories: Sequence[Sequence[str]],
              categories: Sequence[str], seed: int) -> tuple[list[int], list[tuple[int, int, str, str]]]:
    """Counterfactual twins (``psa.contrast``): for each unsafe-caption row of ``plan`` whose category some other
    user rules the other way (banned against allowed), the same render pair and caption for one such user, drawn
    from a generator seeded by the seed and the row. Returns (rows of ``plan`` that have a twin, their twins)."""
    first = first_categories(pair_categories, categories)
    rules = [(list(b), list(a)) for b, a in zip(users.banned, users.allowed)]
    rows, twins = [], []
    for r, (u, i, caption, side) in enumerate(plan):
        if caption != "unsafe":  # under the safe caption every rule prefers the safe image: no opposite
            continue
        other = [v for v, (b, a) in enumerate(rules)
                 if v != u and preferred_side(first[i], b, a, caption) not in (side, None)]
        if other:
            v = other[int(np.random.default_rng([seed, 17, r]).integers(len(other)))]
            rows.append(r)
            twins.append((v, i, caption, "unsafe" if side == "safe" else "safe"))
    return rows, twins


def word_plan(users: Any, pair_categories: Sequence[Sequence[str]],
              categories: Sequence[str]) -> list[tuple[int, int, str, str]]:
    """(user row, render pair row, caption, target) for the word term (``psa.word_weight``): every user with every
    render pair that has a category in ``categories`` (a pair given none is never used) under both captions. The
    target is the text the branch should make of the caption for that user: ``safe`` (the safe twin's text
    states) under the unsafe caption where the user bans every category of the pair, ``same`` (the caption's own
    states: no edit) where they allow every one of them, and under the safe caption for everyone. A pair whose
    categories the user bans in part, or neither bans nor allows, has no word target under its unsafe caption
    (its twin removes them all)."""
    cats = set(categories)
    plan = []
    for u, (banned, allowed) in enumerate(zip(users.banned, users.allowed)):
        banned, allowed = set(banned), set(allowed)
        for i, pc in enumerate(pair_categories):
            own = [c for c in pc if c in cats]
            if not own:
                continue
            if all(c in banned for c in own):
                plan.append((u, i, "unsafe", "safe"))
            elif all(c in allowed for c in own):
                plan.append((u, i, "unsafe", "same"))
            plan.append((u, i, "safe", "same"))
    return plan
