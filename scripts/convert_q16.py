"""Convert Q16's published prompt embeddings (a pickle) to safetensors, once, so the pipeline never unpickles.

Q16 (Schramowski et al., FAccT 2022) ships its learned prompts as ``data/<clip model>/prompts.p``: a pickled
(2, D) array (row 0 'non inappropriate', row 1 'inappropriate'; D = 768 for ViT-L/14). This reads it with a
restricted unpickler that only rebuilds numpy arrays and torch tensors (any other global is refused, so a
tampered file cannot run code) and writes ``{"prompts": float32 (2, D)}`` with the source hash as metadata.

    python scripts/convert_q16.py Q16/data/ViT-L-14/prompts.p models/q16/vit-l-14.safetensors
    dvc exp run -S 'evaluate.options.q16_embeddings=models/q16/vit-l-14.safetensors'
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

LABELS = ("non inappropriate", "inappropriate")


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol-2 pickles write bytes as ``_codecs.encode(str, 'latin1')``; nothing else is let through."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, encoding, errors)


def _storage_from_bytes(data: bytes) -> Any:
    """torch's ``_load_from_bytes`` unpickles fully; this loads the same bytes with torch's weights-only loader."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): dict,  # a tensor's (empty) backward hooks
    ("_codecs", "encode"): _latin1_encode,
}


class TensorOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``ALLOWED``; anything else raises ``UnpicklingError``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            msg = f"refused global {module}.{name}: only numpy/torch tensors are allowed"
            raise pickle.UnpicklingError(msg) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: only numpy/torch tensors are allowed")


def read_prompts(data: bytes) -> torch.Tensor:
    """The two prompt embeddings as float32 (2, D), from the bytes of a Q16 ``prompts.p``."""
    obj = TensorOnlyUnpickler(io.BytesIO(data)).load()
    if isinstance(obj, (list, tuple)):
        obj = np.stack([np.asarray(o.detach().cpu() if isinstance(o, torch.Tensor) else o) for o in obj])
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise ValueError(f"expected a float array, got dtype {obj.dtype}")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or obj.shape[0] != len(LABELS):
        shape = tuple(getattr(obj, "shape", ()))
        raise ValueError(f"expected a (2, D) array of prompt embeddings, got {type(obj).__name__} {shape}")
    return obj.detach().float().contiguous()


def convert(src: Path, dst: Path) -> torch.Tensor:
    data = Path(src).read_bytes()
    prompts = read_prompts(data)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "q16-prompts-v1", "labels": ",".join(LABELS), "source": Path(src).name,
            "source_sha256": hashlib.sha256(data).hexdigest()}
    save_file({"prompts": prompts}, str(dst), metadata=meta)
    return prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="Q16's prompts.p (e.g. Q16/data/ViT-L-14/prompts.p)")
    ap.add_argument("dst", type=Path, help="output .safetensors")
    args = ap.parse_args(argv)
    if args.dst.suffix != ".safetensors":
        ap.error("dst must end in .safetensors")
    prompts = convert(args.src, args.dst)
    print(f"{args.dst}: prompts {tuple(prompts.shape)} ({', '.join(LABELS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
