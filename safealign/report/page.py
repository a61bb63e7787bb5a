"""Pure helpers of the report: flatten metrics, read experiments from ``dvc exp show --json``, write HTML.

Nothing here reads files or imports a heavy library; every function is tested on hand-built input
(``tests/test_report.py``).
"""
from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Columns of the experiments table: (label, flattened key in metrics/evaluate.json), then the params that name a run.
EXPERIMENT_METRICS = (
    ("IP mean (aligned)", "aligned.ip_mean"), ("IP mean (base)", "base.ip_mean"),
    ("fidelity (aligned)", "aligned.fidelity"), ("toy FD (aligned)", "aligned.toy_fd"),
    ("twin rate", "aligned.twin_rate"), ("mean cost", "aligned.cost_mean"),
)
EXPERIMENT_PARAMS = ("method", "merge.method", "sc_dpo.cost_lambda", "sc_dpo.gamma", "sc_dpo.clean_share",
                     "sc_dpo.mode", "train.beta", "train.steps")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": scalar}; lists of scalars are kept as one value."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def fmt(v: Any) -> str:
    """A cell: floats to 3 decimals, None/nan as an em dash, lists joined."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2014"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def image(png: bytes, alt: str) -> str:
    """An <img> whose source is the PNG itself (a data URI): the page needs no other file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def experiments(exp_show: Any) -> list[dict[str, Any]]:
    """Rows of ``dvc exp show --json`` (DVC 3: a list of commits, each with ``experiments`` whose ``revs`` hold
    runs): one row per commit and per experiment with its name, the params in ``EXPERIMENT_PARAMS`` and the
    flattened ``metrics/evaluate.json``. Entries without data (failed or queued runs) are skipped."""
    rows: list[dict[str, Any]] = []

    def add(entry: Mapping[str, Any], name: str) -> None:
        data = entry.get("data") or {}
        metrics = (data.get("metrics") or {}).get("metrics/evaluate.json", {}).get("data")
        if not metrics:
            return
        params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
        rev = str(entry.get("rev", ""))
        rows.append({"name": name, "rev": rev[:7] if re.fullmatch(r"[0-9a-f]{8,40}", rev) else rev,  # a SHA, short
                     **{k: params.get(k) for k in EXPERIMENT_PARAMS}, **flatten(metrics)})

    for commit in exp_show or []:
        add(commit, str(commit.get("name") or commit.get("rev", ""))[:20] or "workspace")
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, str(rev.get("name") or exp.get("name") or rev.get("rev", ""))[:30])
    return rows


def page(title: str, sections: Sequence[tuple[str, str]], note: str = "") -> str:
    """The whole document: a title, a table of contents and the sections ((heading, html body)). An inline
    script marks ``<body data-images="ok:N">`` once every image has decoded (``missing:K`` otherwise), so a
    headless browser can check that nothing failed to load."""
    toc = "".join(f'<li><a href="#s{i}">{html.escape(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "".join(f'<section id="s{i}"><h2>{html.escape(h)}</h2>{b}</section>' for i, (h, b) in enumerate(sections))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:0.6em 0 1.2em}} th,td{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
th{{background:#f2f2f2}} td{{text-align:right}} td:first-child{{text-align:left}} img{{max-width:100%}}
.note{{color:#555;font-size:13px}} code{{background:#f5f5f5}}
</style></head>
<body data-images="pending"><h1>{html.escape(title)}</h1><p class="note">{html.escape(note)}</p><ul>{toc}</ul>{body}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }});
  document.body.setAttribute("data-images", bad.length ? "missing:" + bad.length : "ok:" + imgs.length);
}});
</script></body></html>
"""
