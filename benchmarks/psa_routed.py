"""A reference for PSA: route each user to the merge of the experts of the categories they ban.

No branch and no training: for a user who bans B, the base model with the SafetyDPO experts of B merged by the
pipeline's rule (``merge.method``, ``merge.scale``: the default's, chosen on the training split), the base model
for a user who bans nothing (``safealign.psa.teacher.ExpertsTeacher``, also the teacher of ``psa.teacher:
experts``). Judged by the toy judge on evaluate's protocol (the first ``psa.eval_users`` seen and unseen users,
the first ``psa.eval_prompts_per_category`` test prompts of each category) and on psa_validation's validation
users and prompts, with the prompts' seeds shifted by ``SEED_SHIFT`` (the experts trained on those training
pairs' own seeds, as the baselines' validation set says). Nothing here is tuned on the test users or prompts.
Needs the default pipeline's outputs (`dvc repro`).

    python benchmarks/psa_routed.py --users 24 [--prompts 4] [--set merge.scale=1.0 ...]

Prints a table and, last, one JSON object {protocol: rates}.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from safealign.baselines.validate import SEED_SHIFT
from safealign.core.io import read_table
from safealign.core.params import load_params, parse_overrides
from safealign.core.paths import PAIRS
from safealign.core.runtime import setup_runtime
from safealign.prompts.schema import PAIR_COLUMNS
from safealign.psa import JUDGES
from safealign.psa.evaluate import GROUPS, _cases, _mask, eval_rows
from safealign.psa.method import read_users
from safealign.psa.metrics import pass_rates
from safealign.psa.teacher import ExpertsTeacher, ban_key
from safealign.psa.users import generate_users


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--users", type=int, default=24, help="validation users")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=None, help="prompts per category (psa.eval_prompts_per_category)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override (YAML value)")
    args = ap.parse_args(argv)
    extra = {} if args.prompts is None else {"psa.eval_prompts_per_category": args.prompts}
    extra.update(parse_overrides(args.set))
    params = load_params(args.params, {"runtime.threads": args.threads, **extra})
    device = setup_runtime(params)
    cats, c, u, sp = tuple(params.categories), params.psa, params.users, params.sampling
    users, _, _ = read_users()
    pairs = read_table(PAIRS, PAIR_COLUMNS)
    drawn = generate_users(cats, u.seen, u.unseen + args.users, params.seed, u.consider, u.variety)
    val = drawn.iloc[len(users):].reset_index(drop=True)
    test = pairs[pairs.split == "test"].reset_index(drop=True)
    train = pairs[pairs.split == "train"].reset_index(drop=True)
    # (users, prompt table, seed shift): the validation prompts are training pairs, whose (prompt, seed) the
    # experts trained on, so their seeds are shifted as the baselines' validation set's are
    protocols = {f"test, {g} users": (users[users.split == g].iloc[: c.eval_users].reset_index(drop=True), test, 0)
                 for g in GROUPS}
    protocols["validation users and prompts"] = (val, train, SEED_SHIFT)
    router = ExpertsTeacher(params, [b for us, _, _ in protocols.values() for b in us.banned], device)
    judge = JUDGES.get("toy")(params)
    out = {}
    for name, (us, table, shift) in protocols.items():
        sub = table.iloc[eval_rows(table, cats, c.eval_prompts_per_category)].reset_index(drop=True)
        renders: dict[tuple, np.ndarray] = {}
        for banned in us.banned:
            key = ban_key(banned, cats)
            if key not in renders:
                renders[key] = router.render(banned, list(sub.unsafe_prompt), [int(s) + shift for s in sub.seed],
                                             sp.steps, sp.guidance, sp.batch_size)
        shown = judge.shown(np.concatenate([renders[ban_key(b, cats)] for b in us.banned]))
        cases = _cases(us, _mask(sub.categories, cats), cats)
        out[name] = {"users": len(us), "prompts": len(sub), "banned_sets": len(renders),
                     **pass_rates(shown, cases["carried"], cases["banned"], cases["allowed"], cats)}
    print("\n| protocol | users x prompts | pass rate | banned respected | allowed respected |")
    print("|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['users']} x {r['prompts']} | {r['pass_rate']:.3f} | {r['banned_respected']:.3f} "
              f"| {r['allowed_respected']:.3f} |")
    print(json.dumps({"merge": params.merge.model_dump(), **out}, sort_keys=True, default=float))


if __name__ == "__main__":
    main()
