"""The ``safetydpo`` method: the aligned model is the base model with the merged LoRA of the experts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safealign.core.io import atomic_path
from safealign.core.paths import MERGED

LORA = "lora.safetensors"


class SafetyDPO:
    name = "safetydpo"
    combine = None  # a weight-space method: sampling is unchanged

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        """Copy the merged LoRA (the `merge` stage's, rule ``merge.method``) into ``out``."""
        src = MERGED / LORA
        if not src.exists():
            raise FileNotFoundError(f"{src}: the merged LoRA is missing; run `dvc repro merge`")
        with atomic_path(Path(out) / LORA) as tmp:
            shutil.copyfile(src, tmp)
        info = {"method": self.name, "merge": params.merge.method}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        fam.load_lora(Path(folder) / LORA)
        return [Path(folder) / LORA]
