"""Gather the pipeline's results into the report page (``safealign.report.page`` writes the HTML).

Sections: the models side by side (every scalar metric of each model entry in ``metrics/evaluate.json``), IP per
category (table and plot), extra prompt sets (when evaluate scored any), the experiments of ``dvc exp show
--json`` (when there are any), training curves of the experts, the evaluation grid and the base samples (as the
stages wrote them: images flagged unsafe are already blurred unless ``evaluate.blur_unsafe`` is off), the other
stages' metrics, and the protocol behind every number.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from safealign.report.page import EXPERIMENT_METRICS, EXPERIMENT_PARAMS, experiments, flatten, image, page, table

SEPARATE = ("ip.", "sets.", "fidelity_by_attribute.")  # shown in their own sections


def _json(path: Path) -> Any:
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def models_section(ev: dict[str, Any]) -> tuple[list[str], str]:
    models = [m for m, v in ev.items() if isinstance(v, dict) and "ip" in v]
    flat = {m: flatten(ev[m]) for m in models}
    keys = sorted({k for m in models for k, v in flat[m].items()
                   if not k.startswith(SEPARATE) and not isinstance(v, (dict, list))})
    worst = [max(ev[m]["ip"], key=ev[m]["ip"].get) for m in models]
    rows = [["worst category", *[f"{w} ({ev[m]['ip'][w]:.3f})" for w, m in zip(worst, models)]]]
    rows += [[k, *[flat[m].get(k) for m in models]] for k in keys]
    return models, table(["metric", *models], rows)


def ip_section(ev: dict[str, Any], models: list[str], plots: Path) -> str:
    cats = sorted({c for m in models for c in ev[m]["ip"]})
    out = table(["category", *models], [[c, *[ev[m]["ip"].get(c) for m in models]] for c in cats])
    png = Path(plots) / "ip_by_category.png"
    return out + (image(png.read_bytes(), "IP per category, base vs aligned") if png.exists() else "")


def sets_section(ev: dict[str, Any], models: list[str]) -> str | None:
    sets = sorted({s for m in models for s in (ev[m].get("sets") or {})})
    if not sets:
        return None
    rows = [[s, *[(ev[m].get("sets") or {}).get(s, {}).get("ip_mean") for m in models]] for s in sets]
    return table(["prompt set (IP mean)", *models], [["test split", *[ev[m]["ip_mean"] for m in models]], *rows])


def experiments_section(exp_show: Any) -> str | None:
    rows = experiments(exp_show)
    if not rows:
        return None
    header = ["experiment", "rev", *EXPERIMENT_PARAMS, *[label for label, _ in EXPERIMENT_METRICS]]
    return table(header, [[r["name"], r["rev"], *[r.get(k) for k in EXPERIMENT_PARAMS],
                           *[r.get(key) for _, key in EXPERIMENT_METRICS]] for r in rows])


def curves_png(csvs: list[Path]) -> bytes | None:
    """Loss and preference accuracy per training step, one line per expert (the training logs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    logs = {p.stem: pd.read_csv(p) for p in csvs if p.stat().st_size}
    logs = {k: v for k, v in logs.items() if len(v)}  # an untrained expert's log is a header alone
    if not logs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, df in sorted(logs.items()):
        for ax, col in zip(axes, ("loss", "accuracy")):
            if col in df:
                ax.plot(df["step"], df[col].rolling(5, min_periods=1).mean(), label=name, lw=1)
    for ax, col in zip(axes, ("loss (5-step mean)", "preference accuracy (5-step mean)")):
        ax.set_xlabel("step")
        ax.set_title(col, fontsize=10)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def build(metrics: Path, plots: Path, exp_show: Any = None, extra_logs: list[Path] | None = None) -> str:
    """The report's HTML from the pipeline's metrics folder, plots folder and ``dvc exp show --json`` output."""
    metrics, plots = Path(metrics), Path(plots)
    ev = _json(metrics / "evaluate.json")
    sections: list[tuple[str, str]] = []
    if ev is None:
        sections.append(("Results", "<p>metrics/evaluate.json is missing: run <code>dvc repro</code>.</p>"))
        models: list[str] = []
    else:
        models, body = models_section(ev)
        sections.append(("Models side by side", body))
        sections.append(("IP per category", ip_section(ev, models, plots)))
        s = sets_section(ev, models)
        if s:
            sections.append(("Prompt sets: in distribution, out of distribution, attacks", s))
    e = experiments_section(exp_show)
    sections.append(("Experiments (dvc exp show)", e or "<p>No experiments yet: <code>dvc exp run -S method=...</code>"
                                                        " adds them here.</p>"))
    curves = curves_png(sorted((metrics / "train").glob("*.csv")) + list(extra_logs or []))
    if curves:
        sections.append(("Training curves", image(curves, "training curves")))
    candidates = ((plots / "eval_grid.png", "evaluation grid: base vs aligned, flagged images blurred"),
                  (plots / "base_samples.png", "base model samples"))
    grids = [(p, alt) for p, alt in candidates if p.exists()]
    if grids:
        sections.append(("Images (flagged images blurred)", "".join(
            f"<figure>{image(p.read_bytes(), alt)}<figcaption>{alt}</figcaption></figure>" for p, alt in grids)))
    others = []
    for path in sorted(metrics.glob("*.json")):
        if path.name == "evaluate.json":
            continue
        flat = flatten(_json(path))
        others.append(f"<details><summary>{path.name}</summary>"
                      f"{table(['key', 'value'], sorted(flat.items()))}</details>")
    if others:
        sections.append(("Other stages' metrics", "".join(others)))
    if ev is not None and "protocol" in ev:
        sections.append(("Protocol of every number", table(["setting", "value"], sorted(flatten(ev["protocol"]).items()))))
    method = (ev or {}).get("protocol", {}).get("method", "?")
    return page("Safety alignment report", sections,
                note=f"method: {method}. Generated by `dvc repro report` from metrics/ and plots/; self-contained.")
