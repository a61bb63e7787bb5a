"""Import of published prompt sets (CoProV2, I2P, UnsafeDiffusion) and the leak check between two tables.

Formats (registry ``IMPORTERS``), each ``(path) -> Imported``:
- ``coprov2``: CSV ``prompt,image,category``. In a training file the ``image`` of a row is ``u_<id>.<ext>`` or
  ``s_<id>.<ext>`` (published: ``u_idx_0000000_0.jpg``): the unsafe and the safe prompt of pair ``<id>``.
  Rows may repeat, a pair may be listed once per category, and category spellings vary ("Harrasment",
  "self-harm", "Illegal Activity"): they are normalised to the seven names. A file whose ids carry no
  ``u_``/``s_`` prefix is a list of unsafe test prompts.
- ``i2p``: a prompt column and a ``categories`` column of comma-separated names; per-row seed and guidance from
  ``sd_seed`` and ``sd_guidance_scale`` where the file has them.
- ``ud``: a prompt column and a category column (UnsafeDiffusion's names: sexually explicit, violent, ...).

The prompt column of I2P and UD files is the first of ``PROMPT_COLUMN_NAMES`` the header has (published copies
name it ``caption``), of CoProV2 files ``prompt``; or the one named by ``prompt_column`` (``--prompt-column``); the report says which it read
(``columns``). Per-row seeds (``SEED_COLUMN_NAMES``) and guidance scales (``GUIDANCE_COLUMN_NAMES``) are carried
into the ``seed`` and ``guidance`` columns (``guidance`` only when the file has one; a row without a value gets
the run's ``sampling.guidance`` at evaluation).

A pairs file becomes a table with ``safealign.prompts.schema.PAIR_COLUMNS`` (split 'train', concept ''); a prompt list a
table with ``PROMPT_LIST_COLUMNS``. Errors name the file and the row (data rows count from 1, the header is
row 0): missing column, empty file, a row that is not UTF-8, an empty prompt, an unknown category.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from safealign.core.categories import CATEGORIES
from safealign.core.errors import UserError
from safealign.core.registry import Registry
from safealign.prompts.filters import lexical_matches
from safealign.prompts.schema import PAIR_COLUMNS, normalise

PROMPT_LIST_COLUMNS = ("prompt_id", "prompt", "categories", "seed")  # plus ``guidance`` where the file has one
PROMPT_COLUMN_NAMES = ("prompt", "prompts", "caption", "text")  # accepted spellings, first found wins
SEED_COLUMN_NAMES = ("sd_seed", "seed")
GUIDANCE_COLUMN_NAMES = ("sd_guidance_scale", "guidance_scale", "guidance")

# Spellings seen in published sets (lower case, '-'/' ' -> '_') -> our category names.
CATEGORY_ALIASES = {
    **{c: c for c in CATEGORIES},
    "harrasment": "harassment", "harasment": "harassment", "selfharm": "self_harm", "self_injury": "self_harm",
    "suicide": "self_harm", "sexual_content": "sexual", "sexually_explicit": "sexual", "sex": "sexual",
    "nudity": "sexual", "shocking_images": "shocking", "disturbing": "shocking", "illegal": "illegal_activity",
    "illegal_activities": "illegal_activity", "violent": "violence", "hateful": "hate",
}


class PromptSetError(UserError):
    """A published file that cannot be read as the named format; the message names the file and the row."""


@dataclasses.dataclass
class Imported:
    table: pd.DataFrame
    kind: str  # "pairs" | "prompts"
    stats: dict[str, Any]


def normalise_category(name: str) -> str | None:
    key = re.sub(r"[\s\-]+", "_", name.strip().lower()).strip("_")
    return CATEGORY_ALIASES.get(key)


# -------------------------------------------------------------------------------------------- reading CSV
def read_csv_rows(path: Path, required: dict[str, tuple[str, ...]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Rows of a CSV as dicts, and the column chosen for each role in ``required`` (role -> accepted names).

    Raises PromptSetError naming the file (and the row) for: a missing file, an empty file, bytes that are not
    UTF-8, a missing column, a row with the wrong number of fields.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: file not found")
    data = path.read_bytes()
    if not data.strip():
        raise PromptSetError(f"{path}: empty file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        prefix = data[:line_start].decode("utf-8-sig", errors="replace")
        row = len(list(csv.reader(io.StringIO(prefix))))  # records before the bad one, header included
        line = data.count(b"\n", 0, e.start) + 1
        raise PromptSetError(f"{path}: row {row} (line {line}): not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader)]
    lower = {h.lower(): h for h in header}
    roles = {}
    for role, names in required.items():
        found = next((lower[n] for n in names if n in lower), None)
        if found is None:
            raise PromptSetError(f"{path}: missing column {names[0]!r}"
                               + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else "")
                               + f"; has {', '.join(header)}")
        roles[role] = found
    rows = []
    for n, fields in enumerate(reader, start=1):
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise PromptSetError(f"{path}: row {n}: {len(fields)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, fields), _row=str(n)))
    if not rows:
        raise PromptSetError(f"{path}: no data rows under the header")
    return rows, roles


def _categories(path: Path, row: dict[str, str], value: str, spellings: Counter, sep: str | None = None,
                strict: bool = True, unknown: Counter | None = None) -> list[str]:
    out = []
    for raw in (value.split(sep) if sep else [value]):
        if not raw.strip():
            continue
        name = normalise_category(raw)
        if name is None:
            if strict:
                raise PromptSetError(f"{path}: row {row['_row']}: unknown category {raw.strip()!r}; "
                                   f"allowed: {', '.join(CATEGORIES)} (and known spellings of them)")
            if unknown is not None:
                unknown[raw.strip()] += 1
            continue
        spellings[raw.strip()] += 1
        out.append(name)
    return out


def _prompt(path: Path, row: dict[str, str], col: str) -> str:
    text = " ".join(row[col].split())
    if not text:
        raise PromptSetError(f"{path}: row {row['_row']}: empty prompt")
    return text


def _seed_from_id(pid: str, fallback: int) -> int:
    digits = re.findall(r"\d+", pid)
    return int(digits[0]) if digits else fallback


# ------------------------------------------------------------------------------------------------ coprov2
_PAIR_ID = re.compile(r"^(?P<side>[us])_(?P<id>.+?)(?:\.\w{2,4})?$")


def _prompt_names(prompt_column: str | None, default: tuple[str, ...] = PROMPT_COLUMN_NAMES) -> tuple[str, ...]:
    return (prompt_column.strip().lower(),) if prompt_column else default


def import_coprov2(path: Path, prompt_column: str | None = None) -> Imported:
    rows, col = read_csv_rows(path, {"prompt": _prompt_names(prompt_column, ("prompt",)), "image": ("image",),
                                     "category": ("category",)})
    prefixed = [bool(_PAIR_ID.match(r[col["image"]].strip())) for r in rows]
    if any(prefixed) and not all(prefixed):
        bad = rows[prefixed.index(False)]
        raise PromptSetError(f"{path}: row {bad['_row']}: image {bad[col['image']]!r} has no u_/s_ prefix, but "
                           "other rows do (a training file needs the prefix on every row)")
    if not any(prefixed):
        imported = _coprov2_test(path, rows, col)
        imported.stats["columns"] = {"prompt": col["prompt"]}
        return imported
    spellings: Counter = Counter()
    seen: set[tuple[str, str, str]] = set()
    sides: dict[str, dict[str, str]] = {}  # pair id -> {"u": prompt, "s": prompt}
    cats: dict[str, set[str]] = {}
    duplicate_rows = conflicting = 0
    for r in rows:
        m = _PAIR_ID.match(r[col["image"]].strip())
        assert m is not None
        pid, side = m["id"], m["side"]
        prompt = _prompt(path, r, col["prompt"])
        cat = _categories(path, r, r[col["category"]], spellings)
        key = (f"{side}_{pid}", cat[0] if cat else "", prompt)
        if key in seen:
            duplicate_rows += 1
            continue
        seen.add(key)
        known = sides.setdefault(pid, {})
        if side in known and known[side] != prompt:
            conflicting += 1  # the same image id with another prompt: the first one is kept
            continue
        known[side] = prompt
        cats.setdefault(pid, set()).update(cat)
    complete = [pid for pid, s in sides.items() if "u" in s and "s" in s]
    table = pd.DataFrame({
        "pair_id": complete,
        "categories": [sorted(cats[p]) for p in complete],
        "concept": "",
        "unsafe_prompt": [sides[p]["u"] for p in complete],
        "safe_prompt": [sides[p]["s"] for p in complete],
        "split": "train",
        "seed": [_seed_from_id(p, i) for i, p in enumerate(complete)],
    }, columns=list(PAIR_COLUMNS))
    counts = Counter(c for cs in table["categories"] for c in cs)
    stats = {"format": "coprov2", "kind": "pairs", "rows": len(rows), "pairs": len(table),
             "multi_label_pairs": int((table["categories"].map(len) > 1).sum()),
             "duplicate_rows": duplicate_rows, "conflicting_rows": conflicting,
             "incomplete_pairs": len(sides) - len(complete), "columns": {"prompt": col["prompt"]},
             "categories": {c: counts.get(c, 0) for c in CATEGORIES},
             "category_spellings": {k: normalise_category(k) for k in sorted(spellings)}}
    return Imported(table=table, kind="pairs", stats=stats)


def _coprov2_test(path: Path, rows: list[dict[str, str]], col: dict[str, str]) -> Imported:
    spellings: Counter = Counter()
    prompts: dict[str, str] = {}
    cats: dict[str, set[str]] = {}
    seen: set[tuple[str, str, str]] = set()
    duplicate_rows = conflicting = 0
    for r in rows:
        pid = re.sub(r"\.\w{2,4}$", "", r[col["image"]].strip()) or f"row{r['_row']}"
        prompt = _prompt(path, r, col["prompt"])
        cat = _categories(path, r, r[col["category"]], spellings)
        key = (pid, cat[0] if cat else "", prompt)
        if key in seen:
            duplicate_rows += 1
            continue
        seen.add(key)
        if pid in prompts and prompts[pid] != prompt:
            conflicting += 1
            continue
        prompts[pid] = prompt
        cats.setdefault(pid, set()).update(cat)
    return _prompt_list("coprov2", prompts, cats, {}, len(rows), duplicate_rows, spellings,
                        conflicting_rows=conflicting)


def _prompt_list(fmt: str, prompts: dict[str, str], cats: dict[str, set[str]], seeds: dict[str, int], rows: int,
                 duplicate_rows: int, spellings: Counter, guidance: dict[str, float] | None = None,
                 **extra: Any) -> Imported:
    ids = list(prompts)
    table = pd.DataFrame({
        "prompt_id": ids, "prompt": [prompts[i] for i in ids], "categories": [sorted(cats[i]) for i in ids],
        "seed": [seeds.get(i, _seed_from_id(i, n)) for n, i in enumerate(ids)],
    }, columns=list(PROMPT_LIST_COLUMNS))
    if guidance is not None:  # the file has a guidance column: NaN where a row left it empty
        table["guidance"] = [guidance.get(i, float("nan")) for i in ids]
    counts = Counter(c for cs in table["categories"] for c in cs)
    stats = {"format": fmt, "kind": "prompts", "rows": rows, "prompts": len(table),
             "multi_label_prompts": int((table["categories"].map(len) > 1).sum()),
             "duplicate_rows": duplicate_rows, "categories": {c: counts.get(c, 0) for c in CATEGORIES},
             "category_spellings": {k: normalise_category(k) for k in sorted(spellings)}, **extra}
    return Imported(table=table, kind="prompts", stats=stats)


# --------------------------------------------------------------------------------------------- i2p and ud
def _column(row: dict[str, str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in row if c != "_row"}
    return next((lower[n] for n in names if n in lower), None)


def _number(path: Path, row: dict[str, str], col: str, integer: bool) -> float | None:
    value = (row[col] or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise PromptSetError(f"{path}: row {row['_row']}: {col} {value!r} is not a number") from None
    if integer and not number.is_integer():
        raise PromptSetError(f"{path}: row {row['_row']}: {col} {value!r} is not a whole number")
    return number


def _import_prompt_file(path: Path, fmt: str, category_names: tuple[str, ...], sep: str | None,
                        prompt_column: str | None = None) -> Imported:
    rows, col = read_csv_rows(path, {"prompt": _prompt_names(prompt_column), "category": category_names})
    seed_col = _column(rows[0], SEED_COLUMN_NAMES)
    guidance_col = _column(rows[0], GUIDANCE_COLUMN_NAMES)
    guidance: dict[str, float] = {}
    spellings: Counter = Counter()
    unknown: Counter = Counter()
    prompts: dict[str, str] = {}
    cats: dict[str, set[str]] = {}
    seeds: dict[str, int] = {}
    by_text: dict[str, str] = {}
    duplicate_rows = 0
    for r in rows:
        prompt = _prompt(path, r, col["prompt"])
        cat = _categories(path, r, r[col["category"]], spellings, sep=sep, strict=False, unknown=unknown)
        if prompt in by_text:  # the same prompt again: one prompt, the union of its categories
            duplicate_rows += 1
            cats[by_text[prompt]].update(cat)
            continue
        pid = f"{fmt}_{int(r['_row']):05d}"
        by_text[prompt] = pid
        prompts[pid] = prompt
        cats[pid] = set(cat)
        if seed_col and (seed := _number(path, r, seed_col, integer=True)) is not None:
            seeds[pid] = int(seed)
        if guidance_col and (scale := _number(path, r, guidance_col, integer=False)) is not None:
            guidance[pid] = scale
    return _prompt_list(fmt, prompts, cats, seeds, len(rows), duplicate_rows, spellings,
                        guidance if guidance_col else None,
                        columns={"prompt": col["prompt"], "category": col["category"], "seed": seed_col,
                                 "guidance": guidance_col},
                        unknown_categories=dict(sorted(unknown.items())),
                        uncategorised=sum(1 for c in cats.values() if not c))


def import_i2p(path: Path, prompt_column: str | None = None) -> Imported:
    return _import_prompt_file(path, "i2p", ("categories", "category"), sep=",", prompt_column=prompt_column)


def import_ud(path: Path, prompt_column: str | None = None) -> Imported:
    return _import_prompt_file(path, "ud", ("category", "categories", "label", "class"), sep=None,
                               prompt_column=prompt_column)


# ------------------------------------------------------------------------ released attack sets (case files)
def _category_from_stem(path: Path) -> list[str]:
    """The category a released per-concept file names in its file name (``Nudity_ring-a-bell_16.csv``)."""
    for token in re.split(r"[^A-Za-z]+", path.stem):
        name = normalise_category(token) if token else None
        if name:
            return [name]
    return []


def _import_case_file(path: Path, fmt: str, guidance: bool, prompt_column: str | None = None) -> Imported:
    """Ring-A-Bell / P4D layouts: ``case_number`` (row id), ``prompt`` (or ``prompts``), ``evaluation_seed``,
    P4D also ``evaluation_guidance`` and ``categories``. Without a category column the file name's concept
    (Nudity, Violence, ...) is every row's category."""
    rows, col = read_csv_rows(path, {"prompt": _prompt_names(prompt_column, ("prompt", "prompts"))})
    lower = {c.lower(): c for c in rows[0] if c != "_row"}
    case, seed_col = lower.get("case_number"), lower.get("evaluation_seed")
    cat_col, g_col = lower.get("categories") or lower.get("category"), lower.get("evaluation_guidance")
    fallback = _category_from_stem(path)
    spellings: Counter = Counter()
    ids, prompts, cats, seeds, guid = [], [], [], [], []
    for r in rows:
        pid = f"{fmt}_{(r[case] or '').strip() or r['_row']}" if case else f"{fmt}_{int(r['_row']):05d}"
        if pid in ids:
            raise PromptSetError(f"{path}: row {r['_row']}: case_number {r[case]!r} repeats")
        cat = _categories(path, r, r[cat_col], spellings, sep=",") if cat_col else list(fallback)
        if not cat:
            raise PromptSetError(f"{path}: row {r['_row']}: no category (no 'categories' column and the file name "
                                 "names none)")
        for name, c in (("evaluation_seed", seed_col), ("evaluation_guidance", g_col if guidance else None)):
            if c and not re.fullmatch(r"\s*-?\d+(\.\d*)?\s*", r[c] or ""):
                raise PromptSetError(f"{path}: row {r['_row']}: {name} {r[c]!r} is not a number")
        ids.append(pid)
        prompts.append(_prompt(path, r, col["prompt"]))
        cats.append(sorted(set(cat)))
        seeds.append(int(float(r[seed_col])) if seed_col else _seed_from_id(pid, len(ids) - 1))
        guid.append(float(r[g_col]) if guidance and g_col else float("nan"))
    table = pd.DataFrame({"prompt_id": ids, "prompt": prompts, "categories": cats, "seed": seeds},
                         columns=list(PROMPT_LIST_COLUMNS))
    if guidance and g_col:
        table["guidance"] = guid
    counts = Counter(c for cs in table["categories"] for c in cs)
    stats = {"format": fmt, "kind": "prompts", "rows": len(rows), "prompts": len(table),
             "categories": {c: counts.get(c, 0) for c in CATEGORIES}, "per_row_guidance": bool(guidance and g_col),
             "columns": {"prompt": col["prompt"]}}
    return Imported(table=table, kind="prompts", stats=stats)


def import_ring_a_bell(path: Path, prompt_column: str | None = None) -> Imported:
    return _import_case_file(path, "ring_a_bell", guidance=False, prompt_column=prompt_column)


def import_p4d(path: Path, prompt_column: str | None = None) -> Imported:
    return _import_case_file(path, "p4d", guidance=True, prompt_column=prompt_column)


IMPORTERS: Registry[Callable[..., Imported]] = Registry("prompt-set format")  # (path, prompt_column=None)
IMPORTERS.add("coprov2", import_coprov2)
IMPORTERS.add("i2p", import_i2p)
IMPORTERS.add("ud", import_ud)
IMPORTERS.add("ring_a_bell", import_ring_a_bell)  # released attack sets (case_number, prompt, evaluation_seed)
IMPORTERS.add("p4d", import_p4d)  # + evaluation_guidance, categories


# ------------------------------------------------------------------------------------------------- leaks
def table_prompts(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """(id, prompt) of a pairs table or a prompt list. Pairs: the rows of ``split`` if the table has any (all
    rows otherwise); train contributes unsafe and safe prompts, test its unsafe prompts."""
    if "unsafe_prompt" in df.columns:
        if "split" in df.columns and (df["split"] == split).any():
            df = df[df["split"] == split]
        parts = [pd.DataFrame({"id": df["pair_id"].astype(str), "prompt": df["unsafe_prompt"]})]
        if split == "train":
            parts.append(pd.DataFrame({"id": df["pair_id"].astype(str) + ":safe", "prompt": df["safe_prompt"]}))
        return pd.concat(parts, ignore_index=True)
    if "prompt" in df.columns:
        ids = df["prompt_id"] if "prompt_id" in df.columns else pd.Series(range(len(df)))
        return pd.DataFrame({"id": ids.astype(str).to_numpy(), "prompt": df["prompt"].to_numpy()})
    raise ValueError(f"a prompt table needs 'unsafe_prompt' or 'prompt'; has {list(df.columns)}")


def leak_report(train: pd.DataFrame, test: pd.DataFrame, examples: int = 10, near: float = 0.9) -> dict[str, Any]:
    """Test prompts whose normalised text also appears in train (``overlaps``), with examples; and, apart
    from those, lexical near-duplicates (content-word Jaccard >= ``near``)."""
    tr, te = table_prompts(train, "train"), table_prompts(test, "test")
    first: dict[str, str] = {}
    for pid, p in zip(tr["id"], tr["prompt"]):
        first.setdefault(normalise(p), pid)
    norm = te["prompt"].map(normalise)
    hit = norm.isin(first.keys())
    ex = [{"test_id": i, "prompt": p, "train_id": first[n]}
          for i, p, n in zip(te["id"][hit], te["prompt"][hit], norm[hit])][:examples]
    rest = te[~hit].reset_index(drop=True)
    near_hits = lexical_matches(list(rest["prompt"]), list(tr["prompt"]), near)
    return {"train_prompts": len(tr), "test_prompts": len(te), "overlaps": int(hit.sum()),
            "unique_overlaps": int(norm[hit].nunique()), "examples": ex,
            "near_duplicates": len(near_hits), "near_threshold": near,
            "near_examples": [{"test_id": rest["id"][i], "prompt": rest["prompt"][i], "train_prompt": tr["prompt"][j],
                               "jaccard": round(s, 3)} for i, j, s in near_hits[:examples]]}
