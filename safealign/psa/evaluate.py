"""Per-user evaluation for `evaluate`: Pass Rates of every method's models, and PSA's Win Rates.

The users are the first ``psa.eval_users`` of each group (seen, unseen) of ``data/users/``; the prompts are the
first ``psa.eval_prompts_per_category`` test prompts of each category (the unsafe side; its categories are the
ones it carries). A model that ignores users (base, SafetyDPO, SC-DPO...) is judged against each user's
boundaries from its one image per prompt; a method with ``for_user`` (PSA) renders every prompt for every user
(``data/eval/users/<user_id>/``). For PSA, the SafetyDPO merged model (``models/merged``) is rendered on the same
prompts as a reference, and PSA's Win Rate is measured against it and against the base model, per user group,
with the A/B order drawn from the seed (the judge never sees a method's name).
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.hashing import files_key, json_key
from safealign.core.paths import BASE, EVAL, MERGED, base_files
from safealign.families.rendering import render_to_folder
from safealign.psa import JUDGES
from safealign.psa.method import read_users
from safealign.psa.metrics import case_verdicts, exact_preference, pass_rates, win_rate

GROUPS = ("seen", "unseen")
RATES = ("pass_rate", "banned_respected", "allowed_respected")


def eval_rows(test: pd.DataFrame, categories: tuple[str, ...], per_category: int) -> list[int]:
    """The first ``per_category`` test rows of each category (by its first category in params)."""
    first = [next((c for c in cats if c in categories), None) for cats in test.categories]
    return [i for c in categories for i in [j for j, f in enumerate(first) if f == c][:per_category]]


def _mask(lists: Any, categories: tuple[str, ...]) -> np.ndarray:
    return np.array([[c in set(x) for c in categories] for x in lists], bool).reshape(-1, len(categories))


def _cases(users: pd.DataFrame, carried: np.ndarray, categories: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Case arrays (U * P, C), user-major: banned, allowed and carried of every (user, prompt)."""
    p = carried.shape[0]
    return {"banned": np.repeat(_mask(users.banned, categories), p, axis=0),
            "allowed": np.repeat(_mask(users.allowed, categories), p, axis=0),
            "carried": np.tile(carried, (len(users), 1))}


def user_metrics(params: Any, fam: Any, method: Any, metrics: dict[str, Any], images: dict[str, np.ndarray],
                 test: pd.DataFrame, model_key: str) -> dict[str, Any]:
    """Add ``pass_rate``, ``banned_respected``, ``allowed_respected`` ({seen, unseen} each) to ``metrics[m]`` for
    every model ``m`` in ``images`` (its test images, in ``test`` order), and return the details (by category,
    PSA's reference and Win Rates). ``model_key``: the render key of the aligned model (per-user renders)."""
    c, cats, sp = params.psa, tuple(params.categories), params.sampling
    users, vectors, _ = read_users()
    groups = {g: users.index[users.split == g][: c.eval_users].tolist() for g in GROUPS}
    rows = eval_rows(test, cats, c.eval_prompts_per_category)
    sub = test.iloc[rows].reset_index(drop=True)
    carried = _mask(sub.categories, cats)
    judge = JUDGES.get(c.judge)(params)
    per_user = hasattr(method, "for_user")

    def user_images(view: Any, uid: str, key: str) -> np.ndarray:
        return render_to_folder(view, list(sub.unsafe_prompt), [int(s) for s in sub.seed],
                                [f"test_{p}" for p in sub.pair_id], EVAL / "users" / uid, sp.steps, sp.guidance,
                                sp.batch_size, key, desc=f"render {uid}")

    models: dict[str, dict[str, np.ndarray]] = {}  # model -> group -> images (U * P, H, W, 3), user-major
    for m, imgs in images.items():
        if m == "aligned" and per_user:
            models[m] = {}
            for g, idx in groups.items():
                parts = []
                for i in idx:
                    vkey = hashlib.sha256(vectors[i].numpy().tobytes()).hexdigest()[:16]
                    parts.append(user_images(method.for_user(fam, vectors[i], list(users.banned[i])), users.user_id[i],
                                             json_key(model_key, vkey)))
                models[m][g] = np.concatenate(parts)
        else:
            models[m] = {g: np.tile(imgs[rows], (len(idx), 1, 1, 1)) for g, idx in groups.items()}
    if per_user and c.win_rate:
        models["safetydpo"] = _merged_reference(params, fam.device, sub, groups)
    details: dict[str, Any] = {"users": {g: len(i) for g, i in groups.items()}, "prompts": len(rows),
                               "judge": judge.protocol(), "by_category": {}}
    passes: dict[str, dict[str, np.ndarray]] = {}
    for m, by_group in models.items():
        rates = {}
        for g, idx in groups.items():
            cases = _cases(users.loc[idx], carried, cats)
            profiles = [p for p in users.profile[idx] for _ in rows]
            if judge.needs_profile:
                shown = judge.shown(by_group[g], profiles)
            elif m == "aligned" and per_user:
                shown = judge.shown(by_group[g])
            else:  # one image per prompt, judged once
                shown = np.tile(judge.shown(by_group[g][: len(rows)]), (len(idx), 1))
            rates[g] = pass_rates(shown, cases["carried"], cases["banned"], cases["allowed"], cats)
            passes.setdefault(m, {})[g] = case_verdicts(shown, cases["carried"], cases["banned"], cases["allowed"])["pass"]
        target = metrics.setdefault(m, {}) if m in metrics else details.setdefault("reference", {}).setdefault(m, {})
        for r in RATES:
            target[r] = {g: rates[g][r] for g in groups}
        details["by_category"][m] = {g: {k: v for k, v in rates[g].items() if k.endswith("_by_category")}
                                     for g in groups}
    if per_user and c.win_rate:
        details["win_rate"] = _win_rates(params, judge, models, passes, users, groups, len(rows))
    return details


def _merged_reference(params: Any, device: Any, sub: pd.DataFrame, groups: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The SafetyDPO merged model's images of the evaluation prompts, tiled per group."""
    from safealign.families import get_family
    from safealign.methods import METHODS

    ref = get_family(params.model.family).from_params(params, BASE, str(device))
    identity = METHODS.get("safetydpo")().attach(ref, MERGED, params)
    sp = params.sampling
    imgs = render_to_folder(ref, list(sub.unsafe_prompt), [int(s) for s in sub.seed],
                            [f"test_{p}" for p in sub.pair_id], EVAL / "safetydpo_reference", sp.steps, sp.guidance,
                            sp.batch_size, files_key(base_files() + identity, extra=params.model.model_dump()),
                            desc="render safetydpo reference")
    return {g: np.tile(imgs, (len(idx), 1, 1, 1)) for g, idx in groups.items()}


def _win_rates(params: Any, judge: Any, models: dict[str, dict[str, np.ndarray]],
               passes: dict[str, dict[str, np.ndarray]], users: pd.DataFrame, groups: dict[str, list[int]],
               n_prompts: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for other in ("base", "safetydpo"):
        out[f"vs_{other}"] = {}
        for g, idx in groups.items():
            rng = np.random.default_rng([params.seed, 16, GROUPS.index(g), len(other)])
            first = rng.random(len(passes["aligned"][g])) < 0.5  # PSA shown as A
            if not judge.needs_profile:
                verdicts = exact_preference(passes["aligned"][g], passes[other][g], first)
            else:
                profiles = [p for p in users.profile[idx] for _ in range(n_prompts)]
                x, y = models["aligned"][g], models[other][g]
                verdicts = [judge.compare(x[i], y[i], profiles[i]) if first[i] else judge.compare(y[i], x[i], profiles[i])
                            for i in range(len(first))]
            out[f"vs_{other}"][g] = win_rate([v or "equal" for v in verdicts], list(first))
    return out
