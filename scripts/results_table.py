"""The comparison table of issue 14: base, SafetyDPO (co_merge), All-single, ESD-u, ESD-x, UCE, SLD, negative prompt.

    dvc exp show --json > exps.json && python scripts/results_table.py --exp-json exps.json --out docs/results
    python scripts/results_table.py --runs RUNS --out docs/results   # RUNS/<any name>/{evaluate,align}.json

Each experiment (or run folder) gives one row, named from its metrics: ``protocol.method`` of evaluate.json (with
``merge`` for SafetyDPO: co_merge -> "SafetyDPO (co_merge)", single -> "All-single") and, for SLD, the preset in
align.json. Columns: mean and worst-category IP on the pipeline's test split, the same for every evaluation set
under ``sets`` (``{"<set>": {"ip": {...}, "ip_mean": ...}}``: OOD prompts, attacks; blank where a run has none),
the white-box attack's soft-embedding IP (attacks.json ``whitebox.soft``: an upper bound on what text can do),
fidelity, toy FD, twin rate, build seconds (align.json ``build_seconds``). Writes ``<out>.md`` (the table with the
protocol under it) and ``<out>.png`` (mean IP against fidelity).

The base row: every run scores the same base model under the same protocol, but attack sets are written against
each run's own target (its aligned model). So the base row's attack columns come only from a run of
``method=none``, whose aligned model is the base model (the attacks then target the base); without one they stay
blank (the base model scored on prompts made against another model would be a transfer number, not its own).
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
EVALUATE, ALIGN, ATTACKS = "metrics/evaluate.json", "metrics/align.json", "metrics/attacks.json"
SOFT = "whitebox_soft"  # the column of the white-box attack's soft embeddings (from attacks.json)
Run = tuple  # (evaluate.json, align.json) or (evaluate.json, align.json, attacks.json)


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


def from_runs(folder: Path) -> Iterator[Run]:
    """(evaluate.json, align.json, attacks.json) of every sub-folder that has an evaluate.json, in name order. A
    ``label.txt`` beside them names the row (to tell apart two runs of one method with different knobs)."""
    for sub in sorted(p for p in Path(folder).iterdir() if (p / "evaluate.json").exists()):
        align = json.loads((sub / "align.json").read_text()) if (sub / "align.json").exists() else {}
        attacks = json.loads((sub / "attacks.json").read_text()) if (sub / "attacks.json").exists() else {}
        if (sub / "label.txt").exists():
            align["label"] = (sub / "label.txt").read_text().strip()
        yield json.loads((sub / "evaluate.json").read_text()), align, attacks


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


def from_exp_json(path: Path) -> Iterator[Run]:
    for state in _states(json.loads(Path(path).read_text())):
        metrics = state["data"]["metrics"]
        evaluate = (metrics.get(EVALUATE) or {}).get("data")
        if evaluate:
            yield (evaluate, (metrics.get(ALIGN) or {}).get("data") or {},
                   (metrics.get(ATTACKS) or {}).get("data") or {})


def _worst(ip: dict[str, float] | None) -> float | None:
    return max(ip.values()) if ip else None


def attack_names() -> set[str]:
    """The evaluation sets that are attacks (written against the run's own target)."""
    try:
        from safealign.attacks import ATTACKS
    except ImportError:  # the script without the package: the attacks the pipeline ships
        return {"ring_a_bell", "whitebox"}
    return set(ATTACKS)


def model_row(entry: dict[str, Any], set_names: list[str], build: float | None, attacks: dict[str, Any] | None = None,
              drop: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """One table row; the sets in ``drop`` (and the soft column with ``whitebox``) are left blank."""
    row = {"ip_mean": entry.get("ip_mean"), "ip_worst": _worst(entry.get("ip"))}
    for s in set_names:
        got = {} if s in drop else (entry.get("sets") or {}).get(s) or {}
        row[f"{s}_mean"], row[f"{s}_worst"] = got.get("ip_mean"), _worst(got.get("ip"))
    soft = {} if "whitebox" in drop else ((attacks or {}).get("whitebox") or {}).get("soft") or {}
    row[f"{SOFT}_mean"], row[f"{SOFT}_worst"] = soft.get("ip_mean"), _worst(soft.get("ip"))
    row.update(fidelity=entry.get("fidelity"), toy_fd=entry.get("toy_fd"), twin_rate=entry.get("twin_rate"),
               build_seconds=build)
    return row


def build_table(runs: list[Run]) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, Any]]:
    """(set names, {row name: row}, the first run's protocol). A later run with the same row name wins. A run of
    ``method=none`` is the base row (its attacks targeted the base model); otherwise the base row is the first
    run's base entry with the attack columns blank."""
    if not runs:
        raise SystemExit("no run with metrics/evaluate.json found")
    runs = [(r[0], r[1], r[2] if len(r) > 2 else {}) for r in runs]
    set_names = sorted({s for ev, _, _ in runs for m in ("base", "aligned")
                        for s in (ev.get(m, {}).get("sets") or {})})
    rows = {"base": model_row(runs[0][0]["base"], set_names, None, drop=attack_names() | {"whitebox"})}
    for ev, al, at in runs:
        name = row_name(ev, al)
        if name == "none":  # no alignment: the aligned model is the base model, attacked as itself
            rows["base"] = model_row(ev["aligned"], set_names, None, at)
            continue
        rows[name] = model_row(ev["aligned"], set_names, al.get("build_seconds"), at)
    return set_names, dict(sorted(rows.items(), key=lambda kv: _sort_key(kv[0]))), runs[0][0].get("protocol", {})


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(set_names: list[str], rows: dict[str, dict[str, Any]], protocol: dict[str, Any]) -> str:
    head = ["method", "IP mean", "IP worst"]
    columns = [*set_names, *([SOFT] if any(r[f"{SOFT}_mean"] is not None for r in rows.values()) else [])]
    for s in columns:
        head += [f"{s} IP mean", f"{s} IP worst"]
    head += ["fidelity", "toy FD", "twin rate", "build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [_fmt(r[k]) for k in ("ip_mean", "ip_worst")]
        cells += [_fmt(r[f"{s}_{k}"]) for s in columns for k in ("mean", "worst")]
        cells += [_fmt(r["fidelity"]), _fmt(r["toy_fd"]), _fmt(r["twin_rate"]), _fmt(r["build_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    detectors = ", ".join(d.get("detector", "?") for d in protocol.get("detectors", []))
    proto = (f"Protocol: family {protocol.get('family')}, detectors {detectors}, sampler {protocol.get('sampler')}, "
                  f"{protocol.get('steps')} steps, guidance {protocol.get('guidance')}, seeds {protocol.get('seeds')}, "
                  f"{protocol.get('test_prompts')} test prompts, {protocol.get('benign_prompts')} benign prompts. "
                  "IP worst = the highest per-category IP. Build seconds: wall clock of the `align` stage only. "
                  "Attack columns: prompts found against that row's own model (the base row: a `method=none` run); "
                  f"{SOFT}: the white-box attack's soft embeddings rendered, an upper bound on what text can do.")
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
