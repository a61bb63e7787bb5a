"""Resumable rendering of many prompts into a folder of PNGs.

Rows are cut into fixed batches (rows [k*B, (k+1)*B)), so a resumed run computes exactly the batches an
uninterrupted run computes and its images are bit-identical. A batch is done when its PNGs are written
(atomically) and a line naming the batch and its key is appended to ``journal.jsonl``; on restart, done
batches are skipped. A journal written for another model or other sampling settings is discarded.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from stages.family import Family
from stages.io import atomic_path

JOURNAL = "journal.jsonl"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def save_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def load_png(path: Path, size: int | None = None) -> np.ndarray:
    """Read an RGB PNG as uint8 (H, W, 3); errors name the file (corrupt, or not of the expected size)."""
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds for broken files
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if size is not None and img.shape[:2] != (size, size):
        raise ValueError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected {size}x{size}")
    return img


def render_to_folder(fam: Family, prompts: Sequence[str], seeds: Sequence[int], names: Sequence[str],
                     folder: Path, steps: int, guidance: float, batch_size: int, model_key: str,
                     desc: str = "render") -> np.ndarray:
    """Render ``prompts[i]`` from ``seeds[i]`` into ``folder/names[i].png``, resuming finished batches.

    Returns all images, read back from disk, as uint8 (N, H, W, 3)."""
    folder = Path(folder)
    header = {"model": model_key, "steps": steps, "guidance": guidance, "batch_size": batch_size}
    journal = folder / JOURNAL
    done: set[str] = set()
    if journal.exists():
        lines = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
        if lines and lines[0] == {"header": header}:
            done = {x["batch"] for x in lines[1:] if "batch" in x}
        else:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not journal.exists():
        journal.write_text(json.dumps({"header": header}) + "\n")
    n = len(prompts)
    bar = tqdm(total=n, desc=desc)
    with journal.open("a") as log:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            key = _key(list(names[sl]), list(prompts[sl]), [int(s) for s in seeds[sl]])
            if key in done and all((folder / f"{nm}.png").exists() for nm in names[sl]):
                bar.update(len(names[sl]))
                continue
            images = fam.render(list(prompts[sl]), list(seeds[sl]), steps, guidance, batch_size=batch_size)
            for nm, img in zip(names[sl], images):
                save_png(folder / f"{nm}.png", img)
            log.write(json.dumps({"batch": key}) + "\n")
            log.flush()
            bar.update(len(names[sl]))
    bar.close()
    size = fam.image_size  # a file of another size (replaced by hand, another model's) is named, not stacked
    return np.stack([load_png(folder / f"{nm}.png", size) for nm in names]) if n else np.zeros((0, 1, 1, 3), np.uint8)


def model_key(files: Sequence[Path], extra: object = None) -> str:
    """A short content hash of model files (and e.g. a LoRA), to know when rendered images are stale."""
    h = hashlib.sha256(json.dumps(extra, default=str).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
