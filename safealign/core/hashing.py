"""Content hashing: the one definition of each key the pipeline derives from content.

- ``file_sha256``: the hex digest of one file (weights records, detector protocols).
- ``json_key``: a short key of JSON-able parts (checkpoint and render-journal keys).
- ``files_key``: a short key of files' bytes plus JSON-able extras (is a rendered image stale?).
- ``int_seed``: a 31-bit seed derived from parts (LLM request seeds).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_key(*parts: object, length: int = 16) -> str:
    """sha256 of ``parts`` as JSON (dict keys sorted; anything else by ``str``), first ``length`` hex digits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def files_key(files: Sequence[Path], extra: object = None) -> str:
    """A short content hash of files (a model's weights, a LoRA) and ``extra`` (settings), to know when what was
    rendered with them is stale."""
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def int_seed(*parts: object) -> int:
    """A seed in [0, 2**31) that is a function of ``repr(parts)``."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) % 2**31
