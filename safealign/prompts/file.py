"""The `file` prompt backend: training pairs from a published pair file (CoProV2 layout) instead of a generator.

``prompts.options``:
- ``path`` (required): a CoProV2-layout CSV (``prompt,image,category``, ``u_``/``s_`` image ids; read with the
  ``coprov2`` importer: its normalisation of prompts and category spellings and its de-duplication) or a pairs
  Parquet written by ``python -m stages.prompts import --format coprov2``.
- ``test_share`` (0.1): share of each category's pairs held out as the test split when the file has no test
  rows (a file with ``split == 'test'`` rows keeps its own split).
- ``benign``: a prompt file (CSV with a ``prompt`` or ``caption`` column, or a Parquet prompt list) for the
  benign prompts; without it the safe twins of the test pairs are the benign prompts.
- ``leak_sets``: prompt tables (Parquet, as ``stages.prompts import`` writes them) that will be evaluated; with
  ``evaluate.sets`` when params have it, every training pair whose unsafe or safe prompt (normalised) is in one
  of them is dropped, and what remains is checked again (``leaks`` in metrics/prompts.json).

Leak-free split: a test pair whose unsafe prompt (normalised) appears on either side of a training pair is
dropped. ``prompts.train_per_category`` / ``test_per_category`` / ``benign`` cap the counts (pairs counted under
their first category, in a seeded order): set them large to use the whole file.

DVC does not see a change inside the file itself (only a change of ``prompts.options``): the sha256 of every file
read is in metrics/prompts.json, and ``dvc repro -f prompts`` re-reads a file that changed in place.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import ParamsError, UserError
from safealign.core.hashing import file_sha256
from safealign.core.ids import benign_ids, benign_seeds, pair_ids, pair_seeds
from safealign.core.io import read_table
from safealign.prompts.importers import PROMPT_COLUMN_NAMES, import_coprov2, leak_report, read_csv_rows
from safealign.prompts.schema import BENIGN_COLUMNS, PAIR_COLUMNS, PromptSets, check_pairs, normalise

OPTION_KEYS = ("path", "test_share", "benign", "leak_sets")


def _options(params: Any) -> dict[str, Any]:
    opts = dict(params.prompts.options or {})
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise ParamsError(f"params.yaml: prompts.options.{unknown[0]}: unknown key for backend 'file'; "
                          f"allowed: {', '.join(OPTION_KEYS)}")
    if not opts.get("path"):
        raise ParamsError("params.yaml: prompts.options.path: the `file` backend needs the pair file "
                          "(a CoProV2-layout CSV or an imported pairs Parquet): "
                          "`-S prompts.backend=file -S prompts.options.path=data/coprov2_train.csv`")
    share = opts.get("test_share", 0.1)
    if not isinstance(share, int | float) or not 0 < share < 1:
        raise ParamsError(f"params.yaml: prompts.options.test_share: {share!r}; must be a number in (0, 1)")
    sets = opts.get("leak_sets") or []
    if isinstance(sets, str):
        sets = [sets]
    return {"path": Path(opts["path"]), "test_share": float(share), "benign": opts.get("benign") or "",
            "leak_sets": [str(s) for s in sets]}


def read_pairs(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The pairs of a CoProV2 CSV (through the importer) or of an imported Parquet; its import report."""
    if not path.is_file():
        raise UserError(f"prompts.options.path={path}: file not found")
    if path.suffix.lower() == ".csv":
        imported = import_coprov2(path)
        if imported.kind != "pairs":
            raise UserError(f"prompts.options.path={path}: a list of prompts (no u_/s_ image ids), not training "
                            "pairs; name it in prompts.options.leak_sets or evaluate it as a prompt set")
        return imported.table, {k: v for k, v in imported.stats.items() if k != "categories"}
    table = read_table(path)
    missing = [c for c in PAIR_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"prompts.options.path={path}: not a pairs table (missing {missing}; has "
                        f"{list(table.columns)}); import a CoProV2 CSV with `python -m stages.prompts import`")
    return table, {"format": "parquet", "pairs": len(table)}


def read_prompt_list(path: str | Path, role: str) -> list[str]:
    """The prompts of a CSV (a prompt or caption column) or of a Parquet prompt list / pairs table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role}={path}: file not found")
    if path.suffix.lower() == ".csv":
        rows, col = read_csv_rows(path, {"prompt": PROMPT_COLUMN_NAMES})
        return [" ".join(r[col["prompt"]].split()) for r in rows if r[col["prompt"]].strip()]
    table = read_table(path)
    if "prompt" in table.columns:
        return [str(p) for p in table["prompt"]]
    if "unsafe_prompt" in table.columns:
        return [str(p) for p in table["unsafe_prompt"]]
    raise UserError(f"{role}={path}: no 'prompt' column (has {list(table.columns)})")


def _first(cats: Any) -> str:
    return min(cats) if len(cats) else ""


def _split(pairs: pd.DataFrame, share: float, rng: np.random.Generator) -> pd.Series:
    """Per first category, a seeded ``share`` of the pairs (at least one where a category has two) as test."""
    split = pd.Series("train", index=pairs.index)
    first = pairs["categories"].map(_first)
    for cat in sorted(set(first)):
        idx = np.asarray(pairs.index[first == cat])
        if len(idx) < 2:
            continue
        n_test = max(1, round(share * len(idx)))
        split[rng.permutation(idx)[:n_test]] = "test"
    return split


def _cap(pairs: pd.DataFrame, split: str, per_category: int, rng: np.random.Generator) -> pd.DataFrame:
    part = pairs[pairs["split"] == split]
    part = part.loc[rng.permutation(np.asarray(part.index))]
    first = part["categories"].map(_first)
    return part[first.groupby(first).cumcount() < per_category]


def _eval_sets(params: Any, opts: dict[str, Any]) -> dict[str, str]:
    """name -> path of every prompt table to keep out of training: ``leak_sets`` and ``evaluate.sets``."""
    sets = {Path(p).stem: p for p in opts["leak_sets"]}
    declared: Any = getattr(params.evaluate, "sets", None) or {}  # the evaluation sets, where params have them
    items: Iterable[Any] = declared.items() if isinstance(declared, dict) else enumerate(declared)
    for name, spec in items:
        if isinstance(spec, str):  # evaluate.sets entries: a generated set's name (no file), or '<format>:<path>'
            fmt, sep, rest = spec.partition(":")
            path = rest if sep and fmt.isidentifier() else None
            name = Path(rest).stem if path else name
        else:
            path = spec if isinstance(spec, Path) else (spec.get("path") if isinstance(spec, dict)
                                                        else getattr(spec, "path", None))
        if path:
            sets.setdefault(str(getattr(spec, "name", None) or name), str(path))
    return sets


def file_backend(params: Any) -> PromptSets:
    """Training pairs read from ``prompts.options.path`` (see the module docstring)."""
    opts = _options(params)
    rng = np.random.default_rng(params.seed + 11)
    table, report = read_pairs(opts["path"])
    wanted = set(params.categories)
    table = table.assign(categories=table["categories"].map(lambda cs: sorted(c for c in cs if c in wanted)))
    table = table[table["categories"].map(len) > 0].reset_index(drop=True)
    if table.empty:
        raise UserError(f"prompts.options.path={opts['path']}: no pair of the categories {sorted(wanted)}")
    own_split = "split" in table.columns and (table["split"] == "test").any()
    if not own_split:
        table["split"] = _split(table, opts["test_share"], rng)

    train_norm = set(table.loc[table.split == "train", "unsafe_prompt"].map(normalise)) | set(
        table.loc[table.split == "train", "safe_prompt"].map(normalise))
    test_leak = (table.split == "test") & table["unsafe_prompt"].map(normalise).isin(train_norm)
    table = table[~test_leak]

    sources = {str(opts["path"]): file_sha256(opts["path"])}
    dropped_for: dict[str, int] = {}
    eval_tables = {}
    for name, path in _eval_sets(params, opts).items():
        prompts = read_prompt_list(path, f"leak set {name}")
        sources[str(path)] = file_sha256(Path(path))
        held = {normalise(p) for p in prompts}
        hit = (table.split == "train") & (table["unsafe_prompt"].map(normalise).isin(held)
                                          | table["safe_prompt"].map(normalise).isin(held))
        dropped_for[name] = int(hit.sum())
        table = table[~hit]
        eval_tables[name] = pd.DataFrame({"prompt_id": [f"{name}_{i}" for i in range(len(prompts))],
                                          "prompt": prompts})

    p = params.prompts
    train = _cap(table, "train", p.train_per_category, rng)
    test = _cap(table, "test", p.test_per_category, rng)
    if train.empty or test.empty:
        raise UserError(f"prompts.options.path={opts['path']}: {len(train)} training and {len(test)} test pairs "
                        "after the split and the leak checks; both need at least one")
    pairs = pd.concat([train, test], ignore_index=True)
    pairs = pd.DataFrame({"pair_id": pair_ids(len(pairs)), "categories": pairs["categories"],
                          "concept": pairs["concept"].fillna("").astype(str), "unsafe_prompt": pairs["unsafe_prompt"],
                          "safe_prompt": pairs["safe_prompt"], "split": pairs["split"],
                          "seed": pair_seeds(params.seed, len(pairs))}, columns=list(PAIR_COLUMNS))
    check_pairs(pairs, f"prompts.options.path={opts['path']}")

    if opts["benign"]:
        benign_prompts = read_prompt_list(opts["benign"], "prompts.options.benign")
        sources[str(opts["benign"])] = file_sha256(Path(opts["benign"]))
    else:
        benign_prompts = list(pairs.loc[pairs.split == "test", "safe_prompt"])
    benign_prompts = list(dict.fromkeys(benign_prompts))[:p.benign]
    benign = pd.DataFrame({"prompt_id": benign_ids(len(benign_prompts)), "prompt": benign_prompts,
                           "seed": benign_seeds(params.seed, len(benign_prompts))}, columns=list(BENIGN_COLUMNS))

    leaks = {"test": leak_report(pairs, pairs, examples=3)}
    leaks.update({name: leak_report(pairs, t, examples=3) for name, t in eval_tables.items()})
    stats = {"backend": "file", "source": report, "sources_sha256": sources,
             "split": "file" if own_split else f"seeded, test_share {opts['test_share']}",
             "pairs": {s: int((pairs.split == s).sum()) for s in ("train", "test")},
             "multi_label_pairs": int((pairs.categories.map(len) > 1).sum()), "benign": len(benign),
             "benign_source": str(opts["benign"]) or "safe twins of the test pairs",
             "dropped": {"test_pairs_leaking_train": int(test_leak.sum()),
                         "train_pairs_in_eval_sets": dropped_for},
             "leaks": {k: {"overlaps": v["overlaps"], "near_duplicates": v["near_duplicates"],
                           "test_prompts": v["test_prompts"]} for k, v in leaks.items()},
             "rejected": {}}
    return PromptSets(pairs=pairs, benign=benign, stats=stats)
