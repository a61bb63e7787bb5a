"""Stage `prompts`: write the prompt pairs and the benign prompts with the backend named in params; and the
import of published prompt sets and the leak check between two tables.

    python -m stages.prompts            # the DVC stage: data/prompts/{pairs,benign}.parquet, metrics/prompts.json
    python -m stages.prompts import --format coprov2|i2p|ud --input FILE.csv --output FILE.parquet [--prompt-column caption]
    python -m stages.prompts leaks --train A.parquet --test B.parquet

`import` and `leaks` print, last, one JSON object on stdout (their report); a bad input file is a one-line
error naming the file and row, with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safealign.core.cli import run
from safealign.core.io import read_table, write_json, write_table
from safealign.core.params import load_params
from safealign.core.paths import METRICS, PROMPTS
from safealign.prompts.backends import PROMPT_BACKENDS
from safealign.prompts.importers import IMPORTERS, leak_report
from safealign.prompts.schema import check_pairs


def generate(params_path: str = "params.yaml", out: Path = PROMPTS, metrics: Path = METRICS / "prompts.json") -> None:
    params = load_params(params_path)
    sets = PROMPT_BACKENDS.get(params.prompts.backend)(params)
    check_pairs(sets.pairs, f"prompts backend {params.prompts.backend!r}")
    write_table(out / "pairs.parquet", sets.pairs)
    write_table(out / "benign.parquet", sets.benign)
    write_json(metrics, sets.stats)
    print(f"prompts: {len(sets.pairs)} pairs, {len(sets.benign)} benign prompts -> {out}")


def import_set(fmt: str, src: Path, dst: Path, prompt_column: str | None = None) -> dict:
    imported = IMPORTERS.get(fmt)(src, prompt_column=prompt_column)
    write_table(dst, imported.table)
    return {**imported.stats, "input": str(src), "output": str(dst)}


def leaks(train: Path, test: Path, examples: int) -> dict:
    return {"train": str(train), "test": str(test),
            **leak_report(read_table(train), read_table(test), examples=examples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("generate", help="the DVC stage (the default)")
    imp = sub.add_parser("import", help="import a published prompt set into a Parquet table")
    imp.add_argument("--format", required=True, choices=sorted(IMPORTERS))
    imp.add_argument("--input", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    imp.add_argument("--prompt-column", default=None,
                     help="the prompt column's name (default: the first of prompt, prompts, caption, text)")
    lk = sub.add_parser("leaks", help="test prompts whose normalised text also appears in train")
    lk.add_argument("--train", required=True, type=Path)
    lk.add_argument("--test", required=True, type=Path)
    lk.add_argument("--examples", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command in (None, "generate"):
        generate(args.params)
        return 0
    try:
        report = (import_set(args.format, args.input, args.output, args.prompt_column) if args.command == "import"
                  else leaks(args.train, args.test, args.examples))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
