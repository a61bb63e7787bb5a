"""The ``none`` method: no alignment at all; the "aligned" model is the base model. A reference row for method
comparisons (``dvc exp run -S method=none``): every metric of `aligned` then equals `base`'s."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safealign.core.io import atomic_path


class NoAlignment:
    name = "none"
    combine = None

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        info = {"method": self.name}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        return []  # nothing to attach: the base model renders as it is
