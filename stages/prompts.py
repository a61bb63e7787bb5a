"""Stage `prompts`: write the prompt pairs and the benign prompts with the backend named in params.

    python -m stages.prompts            # the DVC stage: data/prompts/{pairs,benign}.parquet, metrics/prompts.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.config import load_params
from stages.io import write_json, write_table
from stages.pairs import PROMPT_BACKENDS, check_pairs

OUT = Path("data/prompts")


def generate(params_path: str = "params.yaml", out: Path = OUT, metrics: Path = Path("metrics/prompts.json")) -> None:
    params = load_params(params_path)
    sets = PROMPT_BACKENDS.get(params.prompts.backend)(params)
    check_pairs(sets.pairs, f"prompts backend {params.prompts.backend!r}")
    write_table(out / "pairs.parquet", sets.pairs)
    write_table(out / "benign.parquet", sets.benign)
    write_json(metrics, sets.stats)
    print(f"prompts: {len(sets.pairs)} pairs, {len(sets.benign)} benign prompts -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("generate", help="the DVC stage (the default)")
    args = parser.parse_args(argv)
    if args.command in (None, "generate"):
        generate(args.params)


if __name__ == "__main__":
    sys.exit(main())
