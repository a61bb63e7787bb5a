"""Resumable rendering of many prompts into a folder of PNGs, and the encoding of rendered pairs for training.

Rows are cut into fixed batches (rows [k*B, (k+1)*B)), so a resumed run computes exactly the batches an
uninterrupted run computes and its images are bit-identical. A batch is done when its PNGs are written
(atomically) and a line naming the batch and its key is appended to ``journal.jsonl``; on restart, done
batches are skipped. A journal written for another model or other sampling settings is discarded.

Launched as several processes (``safealign.core.runtime.process_shard``: ``accelerate launch``), process ``r`` of
``w`` renders the batches ``k`` with ``k % w == r``: the main process checks the journal and writes its header,
every process appends its own finished batches (one short line each, in append mode), and after a barrier every
process reads all the images back. A row's noise comes from its own seed and the batches are the same, so the
images are byte-identical to one process's, and a run resumed with another process count reuses every batch.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from safealign.core.hashing import json_key
from safealign.core.io import atomic_path
from safealign.core.runtime import process_shard
from safealign.families.base import Family

JOURNAL = "journal.jsonl"


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


def _journal_done(journal: Path, header: dict[str, Any]) -> set[str] | None:
    """The finished batch keys of ``journal``, or None when it was written under another header."""
    lines = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
    if not lines or lines[0] != {"header": header}:
        return None
    return {x["batch"] for x in lines[1:] if "batch" in x}


def render_to_folder(fam: Family, prompts: Sequence[str], seeds: Sequence[int], names: Sequence[str],
                     folder: Path, steps: int, guidance: float, batch_size: int, model_key: str,
                     desc: str = "render", combine: Any = None) -> np.ndarray:
    """Render ``prompts[i]`` from ``seeds[i]`` into ``folder/names[i].png``, resuming finished batches.

    ``model_key`` (``safealign.core.hashing.files_key`` of the model's files and settings) marks the journal, so
    images of another model are never reused; ``combine``: the guidance rule (``safealign.families.sampling``).
    Returns all images, read back from disk, as uint8 (N, H, W, 3)."""
    folder = Path(folder)
    header = {"model": model_key, "steps": steps, "guidance": guidance, "batch_size": batch_size}
    journal = folder / JOURNAL
    rank, world, barrier = process_shard(getattr(fam, "device", "cpu"))
    done: set[str] | None = set()
    if rank == 0:
        done = _journal_done(journal, header) if journal.exists() else set()
        if done is None:
            shutil.rmtree(folder)  # another model's or other settings' images
            done = set()
        folder.mkdir(parents=True, exist_ok=True)
        if not journal.exists():
            journal.write_text(json.dumps({"header": header}) + "\n")
    barrier()
    if rank > 0:  # the journal as the main process left it
        done = _journal_done(journal, header) or set()
    barrier()  # every process has read the journal before any appends to it
    n = len(prompts)
    mine = [start for start in range(0, n, batch_size) if (start // batch_size) % world == rank]
    bar = tqdm(total=sum(min(batch_size, n - start) for start in mine), desc=desc, disable=rank > 0)
    with journal.open("a") as log:
        for start in mine:
            sl = slice(start, start + batch_size)
            key = json_key(list(names[sl]), list(prompts[sl]), [int(s) for s in seeds[sl]])
            if key in done and all((folder / f"{nm}.png").exists() for nm in names[sl]):
                bar.update(len(names[sl]))
                continue
            images = fam.render(list(prompts[sl]), list(seeds[sl]), steps, guidance, batch_size=batch_size,
                                combine=combine)
            for nm, img in zip(names[sl], images):
                save_png(folder / f"{nm}.png", img)
            log.write(json.dumps({"batch": key}) + "\n")
            log.flush()
            bar.update(len(names[sl]))
    bar.close()
    barrier()  # every process's batches are on disk
    size = fam.image_size  # a file of another size (replaced by hand, another model's) is named, not stacked
    return np.stack([load_png(folder / f"{nm}.png", size) for nm in names]) if n else np.zeros((0, 1, 1, 3), np.uint8)


def encode_cache(fam: Family, manifest: Any, images_u: np.ndarray, images_s: np.ndarray,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Model-space images and the conditions of both prompts of every pair, in manifest order: ``x0_w`` (safe
    image), ``x0_l`` (unsafe image), ``cond.*`` (unsafe prompt), ``cond_safe.*`` (safe prompt)."""
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(manifest), batch_size):
            sl = slice(i, i + batch_size)
            to_t = lambda a: torch.from_numpy(a[sl]).permute(0, 3, 1, 2).float() / 255  # noqa: E731
            parts.setdefault("x0_w", []).append(fam.encode_images(to_t(images_s)).cpu())
            parts.setdefault("x0_l", []).append(fam.encode_images(to_t(images_u)).cpu())
            for prefix, column in (("cond", "unsafe_prompt"), ("cond_safe", "safe_prompt")):
                for k, v in fam.encode_prompts(list(manifest[column].iloc[sl])).items():
                    parts.setdefault(f"{prefix}.{k}", []).append(v.cpu())
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}
