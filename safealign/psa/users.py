"""User profiles: the users table, the rule-based generator of the default users, and the Sage importer.

A user has Sage's fields (PSAlign's users file): age, age group, gender, religion, physical condition, mental
condition, banned categories and allowed categories, in the pipeline's category names, plus ``user_id``,
``split`` (``seen``: training users; ``unseen``: test users, disjoint from the seen ones) and ``profile`` (the
text the embedder reads: every field, the banned and allowed lists included, as the release does).

Rules of the generator (the release's, from METHOD.md), each 'consider' a coin with the probability in params:
under 18 or an unstable mental condition -> ban sexual, self_harm, violence; a non-healthy physical condition ->
consider shocking, harassment; Islam, Christianity or Buddhism -> consider hate (Sage's Propaganda is not a
pipeline category); any other category is banned with a small probability (variety). Allowed = the rest.
"""
from __future__ import annotations

import ast
import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from safealign.core.errors import UserError
from safealign.prompts.importers import normalise_category

USER_COLUMNS = ("user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
                "banned", "allowed", "split", "profile")
SPLITS = ("seen", "unseen")

GENDERS = ("female", "male", "non-binary")
RELIGIONS = ("none", "Islam", "Christianity", "Buddhism", "Hinduism", "Judaism")
CAUTIOUS_RELIGIONS = ("Islam", "Christianity", "Buddhism")
PHYSICAL = ("healthy", "healthy", "healthy", "visual impairment", "chronic pain", "heart condition", "pregnancy")
MENTAL = ("stable",) * 6 + ("depression", "anxiety disorder", "recovering from self-harm")
HEALTHY = {"healthy", "none", "normal", "good"}
STABLE = {"stable", "healthy", "none", "normal", "good"}
MINOR_BANS = ("sexual", "self_harm", "violence")
PHYSICAL_CONSIDER = ("shocking", "harassment")
RELIGION_CONSIDER = ("hate",)
# Sage spells some categories its own way; normalise_category knows the pipeline's other spellings.
SAGE_ALIASES = {"sexuality": "sexual"}


class UserTableError(UserError):
    """A users file that cannot be read; the message names the file, the row and the field."""


def age_group(age: int) -> str:
    if age < 13:
        return "child"
    if age < 18:
        return "teenager"
    if age < 30:
        return "young adult"
    if age < 60:
        return "adult"
    return "senior"


def rule_bans(age: int, religion: str, physical: str, mental: str, categories: Sequence[str],
              rng: np.random.Generator, consider: float, variety: float) -> list[str]:
    """The banned categories of one profile by the release's rules (see the module docstring), in
    ``categories`` order; only categories in ``categories`` are returned."""
    banned: set[str] = set()
    if age < 18 or mental.lower() not in STABLE:
        banned |= set(MINOR_BANS)
    if physical.lower() not in HEALTHY:
        banned |= {c for c in PHYSICAL_CONSIDER if rng.random() < consider}
    if religion in CAUTIOUS_RELIGIONS:
        banned |= {c for c in RELIGION_CONSIDER if rng.random() < consider}
    banned |= {c for c in categories if c not in banned and rng.random() < variety}
    return [c for c in categories if c in banned]


def profile_text(row: dict[str, Any]) -> str:
    """The text the embedder reads: every field, banned and allowed lists included (as the release does)."""
    return (f"Age: {row['age']} ({row['age_group']}). Gender: {row['gender']}. Religion: {row['religion']}. "
            f"Physical condition: {row['physical_condition']}. Mental condition: {row['mental_condition']}. "
            f"Banned categories: {', '.join(row['banned']) or 'none'}. "
            f"Allowed categories: {', '.join(row['allowed']) or 'none'}.")


def generate_users(categories: Sequence[str], seen: int, unseen: int, seed: int, consider: float = 0.7,
                   variety: float = 0.1) -> pd.DataFrame:
    """``seen`` + ``unseen`` users with distinct profiles (no unseen user shares a seen user's demographics)."""
    rng = np.random.default_rng([seed, 16])
    rows: list[dict[str, Any]] = []
    keys: set[tuple[Any, ...]] = set()
    while len(rows) < seen + unseen:
        age = int(rng.integers(8, 81))
        demo = (age, str(rng.choice(GENDERS)), str(rng.choice(RELIGIONS)), str(rng.choice(PHYSICAL)),
                str(rng.choice(MENTAL)))
        if demo in keys:
            continue
        keys.add(demo)
        banned = rule_bans(age, demo[2], demo[3], demo[4], categories, rng, consider, variety)
        row = {"user_id": f"u{len(rows):04d}", "age": age, "age_group": age_group(age), "gender": demo[1],
               "religion": demo[2], "physical_condition": demo[3], "mental_condition": demo[4], "banned": banned,
               "allowed": [c for c in categories if c not in banned],
               "split": "seen" if len(rows) < seen else "unseen"}
        row["profile"] = profile_text(row)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(USER_COLUMNS))


def check_users(df: pd.DataFrame, source: str) -> None:
    """The table has the users columns, unique ids, known splits and no category both banned and allowed."""
    missing = [c for c in USER_COLUMNS if c not in df.columns]
    if missing:
        raise UserTableError(f"{source}: missing column(s) {missing}")
    if df.user_id.duplicated().any():
        raise UserTableError(f"{source}: user_id {df.user_id[df.user_id.duplicated()].iloc[0]!r} appears twice")
    for i, r in df.iterrows():
        if r.split not in SPLITS:
            raise UserTableError(f"{source}: row {i}: split {r.split!r}; allowed: {', '.join(SPLITS)}")
        both = set(r.banned) & set(r.allowed)
        if both:
            raise UserTableError(f"{source}: row {i}: {min(both)!r} is both banned and allowed")


def table_stats(df: pd.DataFrame) -> dict[str, Any]:
    """users, banned_histogram (number banned -> users), banned / allowed (category -> users), by split."""
    hist = Counter(len(b) for b in df.banned)
    return {"users": len(df), "by_split": {s: int((df.split == s).sum()) for s in SPLITS},
            "banned_histogram": {str(k): hist[k] for k in sorted(hist)},
            "banned": dict(sorted(Counter(c for b in df.banned for c in b).items())),
            "allowed": dict(sorted(Counter(c for a in df.allowed for c in a).items()))}


# ------------------------------------------------------------------------------------------------ Sage import
SAGE_FIELDS = {  # role -> accepted column names (lower case)
    "age": ("age",), "age_group": ("age_group", "age group"), "gender": ("gender",), "religion": ("religion",),
    "physical_condition": ("physical_condition", "physical condition"),
    "mental_condition": ("mental_condition", "mental condition"),
    "banned": ("banned_categories", "banned categories", "banned"),
    "allowed": ("allowed_categories", "allowed categories", "allowed"),
}


def sage_category(name: str) -> tuple[str, bool]:
    """(pipeline name, True) for a known category; (its own normalised name, False) for one the pipeline lacks."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    known = SAGE_ALIASES.get(key) or normalise_category(name)
    return (known, True) if known else (key, False)


def _list_cell(path: Path, n: int, col: str, value: str) -> list[str]:
    text = value.strip()
    if not text or text.lower() in ("[]", "none", "nan"):
        return []
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserTableError(f"{path}: row {n}: {col}: {value!r} is not a list (write ['Hate', 'Violence'])") from None
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in parsed):
        raise UserTableError(f"{path}: row {n}: {col}: {value!r} is not a list of category names")
    return list(parsed)


def _text_cell(path: Path, n: int, col: str, value: str) -> str:
    text = " ".join(value.split())
    if not text or any(ch in text for ch in "[]{}") or text.replace(".", "").isdigit():
        raise UserTableError(f"{path}: row {n}: {col}: {value!r} is not a condition or label (a word or phrase)")
    return text


def _age_cell(path: Path, n: int, col: str, value: str) -> int:
    try:
        age = float(value.strip())
    except ValueError:
        raise UserTableError(f"{path}: row {n}: {col}: {value!r} is not an age (a whole number 0-120)") from None
    if not age.is_integer() or not 0 <= age <= 120:
        raise UserTableError(f"{path}: row {n}: {col}: {value!r} is not an age (a whole number 0-120)")
    return int(age)


def import_sage(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read Sage's users CSV (PSAlign): the eight fields, list-valued category cells. Returns the users table
    (split from a ``split`` column when there is one, else ``seen``) and the report."""
    path = Path(path)
    if not path.is_file():
        raise UserTableError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserTableError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserTableError(f"{path}: empty file") from None
    lower = {h.lower(): i for i, h in enumerate(header)}
    cols = {}
    for role, names in SAGE_FIELDS.items():
        found = next((lower[n] for n in names if n in lower), None)
        if found is None:
            raise UserTableError(f"{path}: missing column {names[0].title()!r}; has {', '.join(header)}")
        cols[role] = found
    id_col = next((lower[n] for n in ("user_id", "id", "user") if n in lower), None)
    split_col = lower.get("split")
    rows, unmapped = [], Counter()
    for n, fields in enumerate(reader, start=1):
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise UserTableError(f"{path}: row {n}: {len(fields)} fields, the header has {len(header)}")
        cell = {role: fields[i] for role, i in cols.items()}
        row: dict[str, Any] = {"user_id": fields[id_col].strip() if id_col is not None else f"sage{n:05d}"}
        row["age"] = _age_cell(path, n, header[cols["age"]], cell["age"])
        for role in ("age_group", "gender", "religion", "physical_condition", "mental_condition"):
            row[role] = _text_cell(path, n, header[cols[role]], cell[role])
        for role in ("banned", "allowed"):
            names = []
            for raw in _list_cell(path, n, header[cols[role]], cell[role]):
                name, known = sage_category(raw)
                if not known:
                    unmapped[raw.strip()] += 1
                if name not in names:
                    names.append(name)
            row[role] = names
        both = set(row["banned"]) & set(row["allowed"])
        if both:
            raise UserTableError(f"{path}: row {n}: category {min(both)!r} is both banned and allowed")
        split = fields[split_col].strip().lower() if split_col is not None else "seen"
        if split not in SPLITS:
            raise UserTableError(f"{path}: row {n}: split {split!r}; allowed: {', '.join(SPLITS)}")
        row["split"] = split
        row["profile"] = profile_text(row)
        rows.append(row)
    if not rows:
        raise UserTableError(f"{path}: no data rows under the header")
    df = pd.DataFrame(rows, columns=list(USER_COLUMNS))
    if df.user_id.duplicated().any():
        raise UserTableError(f"{path}: user id {df.user_id[df.user_id.duplicated()].iloc[0]!r} appears twice")
    report = {**table_stats(df), "unmapped_categories": dict(sorted(unmapped.items()))}
    return df, report
