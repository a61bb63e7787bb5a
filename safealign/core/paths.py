"""The pipeline's files and folders, relative to the project root (the working directory of every stage).
dvc.yaml names the same paths; this is the one place the code does."""
from __future__ import annotations

from pathlib import Path

PROMPTS = Path("data/prompts")
PAIRS = PROMPTS / "pairs.parquet"
BENIGN = PROMPTS / "benign.parquet"
BASE = Path("models/base")
RENDER = Path("data/render")
EXPERTS = Path("models/experts")
MERGED = Path("models/merged")
ALIGNED = Path("models/aligned")
EVAL = Path("data/eval")
METRICS = Path("metrics")
PLOTS = Path("plots")
CHECKPOINTS = Path("checkpoints")


def base_files(base: Path = BASE) -> list[Path]:
    """The files of the base model folder, sorted (what a render key hashes)."""
    return sorted(f for f in Path(base).iterdir() if f.is_file())
