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
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary name is fixed per target (not per process), so a temporary file that a killed write left
    behind is overwritten and renamed by the next write of the same target instead of piling up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: a NaN (a metric with nothing to measure, e.g. toy fidelity on benign prompts that name no
    toy attribute) is written as null, which every JSON reader and `dvc metrics` accept."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(_nan_to_none(obj), indent=2, sort_keys=True, default=_json_default,
                                  allow_nan=False) + "\n")


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the metadata in sorted key order.

    The library writes metadata keys in a random order (a Rust HashMap), so the same tensors would hash
    differently from run to run; sorting makes the file a function of its content (DVC caching, determinism).
    A file of no tensors (metadata alone) is written without importing torch.
    """
    if tensors:
        from safetensors.torch import save
    else:
        from safetensors.numpy import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(header) + "\n")
        f.write(",".join(_fmt(row[h]) for h in header) + "\n")
        f.flush()


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
