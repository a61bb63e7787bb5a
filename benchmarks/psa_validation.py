"""PSA's knobs chosen on a validation protocol, never on the reported test users and prompts.

Each named setting trains the user branch (as `align` does with `method: psa`) and is judged on
**validation users**: the users the default generator draws next after the seen and unseen ones (the same
rules, demographics disjoint from both), with **validation prompts**: the first ``psa.eval_prompts_per_category``
train-split prompts of each category, held out of the branch's training (no render pair with one of those
unsafe prompts is drawn for the per-user pairs). The test users and test prompts of `evaluate` are not read.
Needs the default pipeline's outputs in the workspace (`dvc repro users render base`).

    python benchmarks/psa_validation.py --set release:psa.query=hidden,psa.null_token=false,psa.unconditional=zeros \
        --set default:                                  # the params.yaml settings
    python benchmarks/psa_validation.py --set mine:psa.steps=600 --users 12 --threads 1

Prints one line per setting as it ends, then a table, and last one JSON object {setting: {rates, train}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from safealign.core.params import load_params, parse_overrides
from safealign.core.runtime import setup_runtime


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, {key: value}); values are YAML ('true', '8', 'text')."""
    name, _, rest = text.partition(":")
    return name, parse_overrides(filter(None, rest.split(",")), f"--set {name}:")


def validate(params: Any, device: str, n_users: int, log_dir: Path) -> dict[str, Any]:
    from safealign.core.io import read_table
    from safealign.core.paths import PAIRS
    from safealign.prompts.schema import PAIR_COLUMNS
    from safealign.psa import JUDGES
    from safealign.psa.branch import UserFamily
    from safealign.psa.evaluate import _cases, _mask, eval_rows
    from safealign.psa.method import embed_texts, read_users, train_user_branch
    from safealign.psa.metrics import pass_rates
    from safealign.psa.users import generate_users
    from safealign.training.data import read_cache

    c, cats, u = params.psa, tuple(params.categories), params.users
    users, _, _ = read_users()
    vectors = embed_texts(params, list(users.profile), device)  # this setting's embedding (profile_parts ...)
    manifest, cache = read_cache()
    pairs = read_table(PAIRS, PAIR_COLUMNS)
    pool = pairs[pairs.split == "train"].reset_index(drop=True)
    sub = pool.iloc[eval_rows(pool, cats, c.eval_prompts_per_category)].reset_index(drop=True)
    # the validation prompts are held out of training: no render pair with one of their unsafe prompts is used
    prompt_of = dict(zip(pairs.pair_id, pairs.unsafe_prompt))
    held = set(sub.unsafe_prompt)
    plan_cats = [[] if prompt_of.get(pid) in held else list(cs) for pid, cs in zip(manifest.pair_id, manifest.categories)]
    t0 = time.perf_counter()
    fam, branch, _, data, train = train_user_branch(params, users, vectors, plan_cats, cache, device,
                                                    log_dir / "train.csv")
    train["seconds"] = round(time.perf_counter() - t0, 1)  # the base model's loading included (under a second on the toy)
    drawn = generate_users(cats, u.seen, u.unseen + n_users, params.seed, u.consider, u.variety)
    val = drawn.iloc[len(users):].reset_index(drop=True)
    if set(val.profile) & set(users.profile):
        raise RuntimeError("validation users overlap the users table (not the default generator's table?)")
    val_vectors = embed_texts(params, list(val.profile), device)
    sp = params.sampling
    images = np.concatenate([UserFamily(fam, branch, val_vectors[i]).render(
        list(sub.unsafe_prompt), [int(s) for s in sub.seed], sp.steps, sp.guidance, sp.batch_size)
        for i in range(len(val))])
    shown = JUDGES.get("toy")(params).shown(images)
    cases = _cases(val, _mask(sub.categories, cats), cats)
    rates = pass_rates(shown, cases["carried"], cases["banned"], cases["allowed"], cats)
    return {"rates": rates, "train": train, "users": len(val), "prompts": len(sub), "pairs": len(data),
            "held_out_render_pairs": sum(not x for x in plan_cats)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", dest="settings", required=True, metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--users", type=int, default=12, help="validation users")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    for text in args.settings:
        name, overrides = parse_setting(text)
        params = load_params(args.params, {"runtime.threads": args.threads, "method": "psa", **overrides})
        device = setup_runtime(params)
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = {"overrides": overrides, "psa": params.psa.model_dump(),
                             **validate(params, device, args.users, Path(tmp))}
        r = results[name]["rates"]
        print(f"{name}: pass {r['pass_rate']:.3f} banned-respected {r['banned_respected']:.3f} "
              f"allowed-respected {r['allowed_respected']:.3f}", file=sys.stderr, flush=True)
    print("\n| setting | pass rate | banned respected | allowed respected | train margin (last 20) | train s (model load included) |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        r, t = res["rates"], res["train"]
        print(f"| {name} | {r['pass_rate']:.3f} | {r['banned_respected']:.3f} | {r['allowed_respected']:.3f} "
              f"| {t['margin']:.2f} | {t['seconds']:.0f} |")
    print(json.dumps(results, sort_keys=True, default=float))


if __name__ == "__main__":
    main()
