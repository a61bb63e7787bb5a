"""Extra evaluation prompt sets (``evaluate.sets``): load them, render them per model, score IP per category.

A prompt-set table has ``safealign.prompts.importers.PROMPT_LIST_COLUMNS`` (``prompt_id, prompt, categories,
seed``) and an optional ``guidance`` column; per-row ``seed`` and ``guidance`` are honoured (a row without a
guidance uses ``sampling.guidance``). A set named in ``evaluate.sets`` is one of:

- a source in ``safealign.evaluation.SETS``: ``ood`` (the family's out-of-distribution generator, in
  ``OOD_GENERATORS``; the toy world's is ``safealign.toyworld.ood``), ``ring_a_bell`` and ``whitebox`` (the
  `attack` stage's outputs ``data/attacks/<name>.parquet``);
- ``<format>:<path>``: a file read by an importer (``safealign.prompts.importers.IMPORTERS``: i2p, ud, coprov2,
  ring_a_bell, p4d) or ``table:<path>`` (a Parquet table with the columns above); the set's name is the file stem.

A set that cannot be loaded because a file is missing (an attack not yet run) is reported under ``missing``
with the reason, never scored. ``metrics/evaluate.json`` gains, per model, ``sets: {name: {ip, ip_mean, prompts}}``
and, where a detector reports per-category flags, ``target_rate`` (each category's rows showing its own concept).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import UserError
from safealign.core.registry import Registry

ATTACKS_DIR = Path("data/attacks")
SET_COLUMNS = ("prompt_id", "prompt", "categories", "seed")  # = importers.PROMPT_LIST_COLUMNS; + optional guidance
FILE_SPEC = re.compile(r"^(?P<format>[a-z0-9_]+):(?P<path>.+)$")

# family -> its OOD prompt generator ``(params) -> table``
OOD_GENERATORS: Registry[Callable[[Any], pd.DataFrame]] = Registry("OOD prompt generator")
OOD_GENERATORS.add_lazy("toy", "safealign.toyworld.ood:ood_set")


class SetMissing(FileNotFoundError):
    """A set's file is not there yet (reported under ``missing``, like a detector without weights)."""


# ------------------------------------------------------------------------------------------------ sources
def ood_source(params: Any) -> pd.DataFrame:
    family = params.model.family
    if family not in OOD_GENERATORS:
        raise SetMissing(f"evaluate.sets: 'ood': family {family!r} has no OOD generator; import a file instead "
                        "(e.g. 'i2p:data/i2p.csv')")
    return OOD_GENERATORS.get(family)(params)


def attack_table(name: str) -> pd.DataFrame:
    path = ATTACKS_DIR / f"{name}.parquet"
    if not path.exists():
        raise SetMissing(f"{path}: not found; run `dvc repro attack` (or `python -m stages.attack`)")
    return pd.read_parquet(path)


def ring_a_bell_source(params: Any) -> pd.DataFrame:
    return attack_table("ring_a_bell")


def whitebox_source(params: Any) -> pd.DataFrame:
    return attack_table("whitebox")


def file_source(fmt: str, path: str) -> pd.DataFrame:
    if not Path(path).exists():
        raise SetMissing(f"{path}: not found")
    if fmt == "table":
        return pd.read_parquet(path)
    from safealign.prompts.importers import IMPORTERS

    if fmt not in IMPORTERS:
        raise UserError(f"evaluate.sets: {fmt}:{path}: unknown format {fmt!r}; allowed: table, "
                        f"{', '.join(sorted(IMPORTERS))}")
    imported = IMPORTERS.get(fmt)(Path(path))
    if imported.kind != "prompts":
        raise UserError(f"evaluate.sets: {fmt}:{path}: a pairs file; an evaluation set is a prompt list")
    return imported.table


def set_name(spec: str) -> str:
    m = FILE_SPEC.match(spec)
    return Path(m["path"]).stem if m else spec


def check_spec(spec: str) -> str:
    """``spec`` if it names a registered source or reads ``<format>:<path>`` (nothing imported), else ValueError."""
    from safealign.evaluation import SETS

    if spec in SETS or FILE_SPEC.match(spec):
        return spec
    raise ValueError(f"unknown evaluation set {spec!r}; allowed: {', '.join(sorted(SETS))}, or '<format>:<path>'")


def check_table(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The set's table with its columns checked (errors name the set and the row)."""
    missing = [c for c in SET_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"evaluate.sets: {name}: missing column(s) {missing}; has {list(df.columns)}")
    df = df.reset_index(drop=True)
    for i, cats in enumerate(df["categories"]):
        if len(cats) == 0:
            raise UserError(f"evaluate.sets: {name}: row {i + 1} ({df.prompt_id[i]}): no category")
    if df["prompt_id"].duplicated().any():
        dup = df["prompt_id"][df["prompt_id"].duplicated()].iloc[0]
        raise UserError(f"evaluate.sets: {name}: prompt_id {dup!r} repeats")
    return df


def load_sets(params: Any) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """{name: table} of ``evaluate.sets``, and {"set:<name>": reason} for sets whose files are missing."""
    from safealign.evaluation import SETS

    tables, missing = {}, {}
    for spec in params.evaluate.sets:
        name = set_name(spec)
        try:
            m = FILE_SPEC.match(spec)
            df = file_source(m["format"], m["path"]) if m and spec not in SETS else SETS.get(spec)(params)
        except SetMissing as e:
            missing[f"set:{name}"] = str(e)
            continue
        tables[name] = check_table(df, name)
    return tables, missing


# ------------------------------------------------------------------------------------------------ scoring
def row_guidance(table: pd.DataFrame, default: float) -> np.ndarray:
    """float (N,): each row's guidance (its ``guidance`` cell where present and not null, else ``default``)."""
    if "guidance" not in table.columns:
        return np.full(len(table), float(default))
    g = pd.to_numeric(table["guidance"], errors="coerce").to_numpy(dtype=float)
    return np.where(np.isnan(g), float(default), g)


def set_ip(flags: np.ndarray, categories: list[list[str]], names: tuple[str, ...]) -> dict[str, Any]:
    """{ip: {category: share flagged}, ip_mean}: only the categories the set has rows for (a category with no
    row is left out, never counted as 0); ip_mean is the mean over those."""
    from safealign.evaluation.metrics import ip_by_category

    present = tuple(c for c in names if any(c in cats for cats in categories))
    ip = ip_by_category(np.asarray(flags, bool), categories, present)
    return {"ip": ip, "ip_mean": float(np.mean(list(ip.values()))) if ip else float("nan"), "prompts": len(flags)}


def render_table(fam: Any, sampling: Any, key: str, folder: Path, table: pd.DataFrame, combine: Any = None) -> np.ndarray:
    """Render every row from its seed at its guidance (rows grouped by guidance, one resumable folder each);
    uint8 (N, H, W, 3) in table order."""
    from safealign.families.rendering import render_to_folder

    guidance = row_guidance(table, sampling.guidance)
    out: np.ndarray | None = None
    for g in sorted(set(guidance.tolist())):
        rows = np.flatnonzero(guidance == g)
        images = render_to_folder(fam, list(table.prompt.iloc[rows]), [int(s) for s in table.seed.iloc[rows]],
                                  [str(p) for p in table.prompt_id.iloc[rows]], Path(folder) / f"g{g:g}",
                                  sampling.steps, g, sampling.batch_size, key, desc=f"render {folder}",
                                  combine=combine)
        if out is None:
            out = np.zeros((len(table), *images.shape[1:]), np.uint8)
        out[rows] = images
    return out if out is not None else np.zeros((0, 1, 1, 3), np.uint8)


def score_sets(fam: Any, params: Any, key: str, model: str, tables: dict[str, pd.DataFrame], detectors: list[Any],
               root: Path, combine: Any = None) -> dict[str, Any]:
    """{set: {ip, ip_mean, prompts}} of one model (rendered into ``root/<set>/<model>/``)."""
    from safealign.evaluation.scoring import flag

    out = {}
    for name, table in tables.items():
        images = render_table(fam, params.sampling, key, Path(root) / name / model, table, combine)
        cats = list(map(list, table.categories))
        out[name] = set_ip(flag(images, detectors), cats, params.categories)
        own = target_rate(images, cats, detectors, params.categories)
        if own:
            out[name]["target_rate"] = own
    return out


def target_rate(images: np.ndarray, categories: list[list[str]], detectors: list[Any],
                names: tuple[str, ...]) -> dict[str, float]:
    """Per category, the share of its rows whose image shows that category's own concept: IP counts any
    category's concept, so an attack on one category can score by drawing another's. Needs a detector with
    per-category flags (``per_category(images) -> {category: bool (N,)}``, the toy judge); else {}."""
    det = next((d for d in detectors if hasattr(d, "per_category")), None)
    if det is None or not len(images):
        return {}
    per = det.per_category(images)
    out = {}
    for c in names:
        rows = np.array([c in cats for cats in categories], bool)
        if rows.any() and c in per:
            out[c] = float(per[c][rows].mean())
    return out
