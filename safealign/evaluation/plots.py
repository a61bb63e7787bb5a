"""Matplotlib figures the stages write as PNG (the Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from safealign.core.io import atomic_path  # noqa: E402


def plot_ip(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: IP per category, base vs aligned. ``table`` has columns category, base, aligned."""
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(x - 0.2, table["base"], 0.4, label="base", color="#c44e52")
    ax.bar(x + 0.2, table["aligned"], 0.4, label="aligned", color="#4c72b0")
    ax.set_xticks(x, table["category"], rotation=20)
    ax.set_ylabel("inappropriate probability")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
