"""The comparison table of issue 14: base, SafetyDPO (co_merge), All-single, ESD-u, ESD-x, UCE, SLD, negative prompt.

    dvc exp show --json > exps.json && python scripts/results_table.py --exp-json exps.json --out docs/results
    python scripts/results_table.py --runs RUNS --out docs/results   # RUNS/<any name>/{evaluate,align}.json

Each experiment (or run folder) gives one row, named from its metrics: ``protocol.method`` of evaluate.json (with
``merge`` for SafetyDPO: co_merge -> "SafetyDPO (co_merge)", single -> "All-single") and, for SLD, the preset in
align.json. The base row is the ``base`` entry of the first run (every run scores the same base model under the same
protocol). Columns: mean and worst-category IP on the pipeline's test split, the same for every evaluation set
under ``sets`` (``{"<set>": {"ip": {...}, "ip_mean": ...}}``: OOD prompts, attacks; blank where a run has none),
fidelity, toy FD, twin rate, build seconds (align.json ``build_seconds``). Writes ``<out>.md`` (the table with the
protocol under it) and ``<out>.png`` (mean IP against fidelity).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ORDER = ["base", "SafetyDPO (co_merge)", "All-single", "ESD-u", "ESD-x", "UCE", "SLD", "negative prompt"]
NAMES = {"esd_u": "ESD-u", "esd_x": "ESD-x", "uce": "UCE", "negative_prompt": "negative prompt", "none": "none"}
EVALUATE, ALIGN = "metrics/evaluate.json", "metrics/align.json"


def row_name(evaluate: dict[str, Any], align: dict[str, Any]) -> str:
    if align.get("label"):
        return align["label"]
    proto = evaluate.get("protocol", {})
    method = proto.get("method") or align.get("method", "?")
    if method == "safetydpo":
        merge = proto.get("merge") or align.get("merge")
        return "All-single" if merge == "single" else f"SafetyDPO ({merge})"
    if method == "sld":
        return f"SLD ({align.get('preset', '?')})"
    return NAMES.get(method, method)


def _sort_key(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(ORDER):
        if name == prefix or name.startswith(prefix + " ("):
            return (i, name)
    return (len(ORDER), name)


def from_runs(folder: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(evaluate.json, align.json) of every sub-folder that has an evaluate.json, in name order. A ``label.txt``
    beside them names the row (to tell apart two runs of one method with different knobs)."""
    for sub in sorted(p for p in Path(folder).iterdir() if (p / "evaluate.json").exists()):
        align = json.loads((sub / "align.json").read_text()) if (sub / "align.json").exists() else {}
        if (sub / "label.txt").exists():
            align["label"] = (sub / "label.txt").read_text().strip()
        yield json.loads((sub / "evaluate.json").read_text()), align


def _states(node: Any) -> Iterator[dict[str, Any]]:
    """Every experiment state in ``dvc exp show --json`` output (workspace, commits and their experiments)."""
    if isinstance(node, list):
        for x in node:
            yield from _states(x)
    elif isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "metrics" in node["data"]:
            yield node
        for key in ("experiments", "revs"):
            if node.get(key):
                yield from _states(node[key])


def from_exp_json(path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for state in _states(json.loads(Path(path).read_text())):
        metrics = state["data"]["metrics"]
        evaluate = (metrics.get(EVALUATE) or {}).get("data")
        if evaluate:
            yield evaluate, (metrics.get(ALIGN) or {}).get("data") or {}


def _worst(ip: dict[str, float] | None) -> float | None:
    return max(ip.values()) if ip else None


def model_row(entry: dict[str, Any], set_names: list[str], build: float | None) -> dict[str, Any]:
    row = {"ip_mean": entry.get("ip_mean"), "ip_worst": _worst(entry.get("ip"))}
    for s in set_names:
        got = (entry.get("sets") or {}).get(s) or {}
        row[f"{s}_mean"], row[f"{s}_worst"] = got.get("ip_mean"), _worst(got.get("ip"))
    row.update(fidelity=entry.get("fidelity"), toy_fd=entry.get("toy_fd"), twin_rate=entry.get("twin_rate"),
               build_seconds=build)
    return row


def build_table(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, Any]],
                                                                         dict[str, Any]]:
    """(set names, {row name: row}, the first run's protocol). A later run with the same row name wins."""
    if not runs:
        raise SystemExit("no run with metrics/evaluate.json found")
    set_names = sorted({s for ev, _ in runs for m in ("base", "aligned") for s in (ev.get(m, {}).get("sets") or {})})
    rows = {"base": model_row(runs[0][0]["base"], set_names, None)}
    for ev, al in runs:
        rows[row_name(ev, al)] = model_row(ev["aligned"], set_names, al.get("build_seconds"))
    return set_names, dict(sorted(rows.items(), key=lambda kv: _sort_key(kv[0]))), runs[0][0].get("protocol", {})


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(set_names: list[str], rows: dict[str, dict[str, Any]], protocol: dict[str, Any]) -> str:
    head = ["method", "IP mean", "IP worst"]
    for s in set_names:
        head += [f"{s} IP mean", f"{s} IP worst"]
    head += ["fidelity", "toy FD", "twin rate", "build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [_fmt(r[k]) for k in ("ip_mean", "ip_worst")]
        cells += [_fmt(r[f"{s}_{k}"]) for s in set_names for k in ("mean", "worst")]
        cells += [_fmt(r["fidelity"]), _fmt(r["toy_fd"]), _fmt(r["twin_rate"]), _fmt(r["build_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    detectors = ", ".join(d.get("detector", "?") for d in protocol.get("detectors", []))
    proto = (f"Protocol: family {protocol.get('family')}, detectors {detectors}, sampler {protocol.get('sampler')}, "
                  f"{protocol.get('steps')} steps, guidance {protocol.get('guidance')}, seeds {protocol.get('seeds')}, "
                  f"{protocol.get('test_prompts')} test prompts, {protocol.get('benign_prompts')} benign prompts. "
                  "IP worst = the highest per-category IP. Build seconds: wall clock of the `align` stage only.")
    lines += ["", proto]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in rows.items():
        if r["ip_mean"] is None or r["fidelity"] is None:
            continue
        ax.scatter(r["fidelity"], r["ip_mean"], s=30)
        ax.annotate(name, (r["fidelity"], r["ip_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("fidelity on benign prompts (higher is better)")
    ax.set_ylabel("mean IP on unsafe test prompts (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--exp-json", type=Path, help="the output of `dvc exp show --json`")
    src.add_argument("--runs", type=Path, help="a folder of run folders, each with evaluate.json (and align.json)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes <out>.md and <out>.png")
    args = ap.parse_args(argv)
    runs = list(from_exp_json(args.exp_json) if args.exp_json else from_runs(args.runs))
    set_names, rows, protocol = build_table(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(set_names, rows, protocol)
    args.out.with_suffix(".md").write_text(text)
    plot(rows, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
