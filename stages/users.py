"""Stage `users`: the users table (PSA) and its profile vectors; the Sage importer; rendering for one user.

    python -m stages.users                      # the DVC stage: data/users/{users.parquet,embeddings.safetensors}
    python -m stages.users import --format sage --input users.csv --output users.parquet
    python -m stages.users render (--profile TEXT | --user USER_ID) --prompt P [--prompt P ...] --out DIR

`import` prints, last, one JSON object on stdout (users, banned_histogram, banned, allowed,
unmapped_categories); a malformed row is a one-line error naming the file, row and field (exit 2). `render`
renders the prompts with the trained branch (models/aligned, method psa) for the profile and writes the PNGs and
`verdicts.json` (the judge's verdict per image for that profile).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safealign.core.cli import run
from safealign.core.io import atomic_path, safetensors_bytes, write_json, write_table
from safealign.core.params import load_params
from safealign.core.paths import METRICS

FORMATS = ("sage",)


def generate(params_path: str) -> None:
    from safealign.core.runtime import setup_runtime
    from safealign.psa.method import USER_VECTORS, USERS_TABLE, embed_texts
    from safealign.psa.users import check_users, generate_users, table_stats

    params = load_params(params_path)
    device = setup_runtime(params)
    u = params.users
    users = generate_users(params.categories, u.seen, u.unseen, params.seed, u.consider, u.variety)
    check_users(users, "users generator")
    vectors = embed_texts(params, list(users.profile), device)
    write_table(USERS_TABLE, users)
    with atomic_path(USER_VECTORS) as tmp:
        tmp.write_bytes(safetensors_bytes({"vectors": vectors.contiguous()},
                                          {"user_ids": json.dumps(list(users.user_id)), "embedder": params.psa.embedder}))
    stats = table_stats(users)
    write_json(METRICS / "users.json", {**stats, "embedder": params.psa.embedder, "dim": int(vectors.shape[1])})
    print(f"users: {len(users)} users ({stats['by_split']}) -> {USERS_TABLE}")


def import_users(fmt: str, src: Path, dst: Path) -> dict:
    from safealign.psa.users import import_sage

    table, report = import_sage(src)
    write_table(dst, table)
    return {**report, "format": fmt, "input": str(src), "output": str(dst)}


def render(params_path: str, profile: str | None, user: str | None, prompts: list[str], out: Path, seed: int) -> dict:
    from safealign.core.runtime import setup_runtime
    from safealign.psa.render import render_for_profile

    params = load_params(params_path)
    return render_for_profile(params, profile, user, prompts, out, seed, setup_runtime(params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.users", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("generate", help="the DVC stage (the default)")
    imp = sub.add_parser("import", help="import a published users file into a Parquet table")
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("--input", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    ren = sub.add_parser("render", help="render prompts for one profile with the trained branch")
    who = ren.add_mutually_exclusive_group(required=True)
    who.add_argument("--profile", help="the profile as text")
    who.add_argument("--user", help="a user_id of data/users/users.parquet")
    ren.add_argument("--prompt", action="append", required=True)
    ren.add_argument("--out", required=True, type=Path)
    ren.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in (None, "generate"):
        generate(args.params)
        return 0
    if args.command == "import":
        report = import_users(args.format, args.input, args.output)
    else:
        report = render(args.params, args.profile, args.user, args.prompt, args.out, args.seed)
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
