"""Atomic writes and table I/O. A stage writes to a temporary file beside the target and renames it, so an
interrupted stage never leaves a partial file where an output is expected."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(Path(path)) as tmp:
        df.to_parquet(tmp, index=False)


def read_table(path: Path, columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a Parquet table and check it has ``columns``; errors name the file and what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: table not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise ValueError(f"{path}: not a readable Parquet table ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    return df


def write_csv_row(path: Path, row: dict[str, Any], header: Sequence[str]) -> None:
    """Append one row to a CSV log (header written when the file is new)."""
    path = Path(path)
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(header) + "\n")
        f.write(",".join(_fmt(row[h]) for h in header) + "\n")
        f.flush()


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
