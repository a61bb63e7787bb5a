"""The report (safealign/report, stages/report.py): the pure helpers on hand-built input and on real `dvc exp show
--json` output (tests/fixtures/exp_show.json, written by DVC 3.67 for one commit and one experiment); the page
built from the tiny pipeline run is self-contained (no URL anywhere, every image a PNG data URI); and it opens in
headless Chromium with every table and image there and every image decoded."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_inline

from safealign.report.page import experiments, flatten, fmt, page, table

FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"


def test_flatten_fmt_and_table_escaping() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert [fmt(x) for x in (0.12345, None, float("nan"), True, [0.5, "x"], 3)] == \
        ["0.123", "\u2014", "\u2014", "true", "0.500, x", "3"]
    html = table(["k", "<v>"], [["<script>", 1.0]])
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;v&gt;" in html and "1.000" in html


def test_experiments_from_real_dvc_exp_show_output() -> None:
    import json

    rows = experiments(json.loads(FIXTURE.read_text()))
    assert [r["name"] for r in rows] == ["workspace", "master", "try-b"]
    assert rows[0]["rev"] == "workspace" and all(len(r["rev"]) == 7 for r in rows[1:])  # SHAs short, names whole
    assert [r["method"] for r in rows] == ["b", "a", "b"]
    assert [r["aligned.ip_mean"] for r in rows] == [0.25, 0.5, 0.25] and rows[2]["merge.method"] == "co"
    assert experiments(None) == [] and experiments([{"rev": "x", "data": {}, "experiments": None}]) == []


def test_page_marks_images_for_the_browser_check() -> None:
    doc = page("T", [("one", "<p>x</p>")])
    assert doc.startswith("<!DOCTYPE html>") and 'data-images="pending"' in doc and 'href="#s0"' in doc


def _report(tiny_reference: Path, tmp_path: Path) -> Path:
    project = tmp_path / "p"
    shutil.copytree(tiny_reference, project, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
    run_inline(project, "report", "--experiments", str(FIXTURE))
    return project / "report" / "index.html"


def test_report_of_the_tiny_run_is_self_contained(tiny_reference: Path, tmp_path: Path) -> None:
    html = _report(tiny_reference, tmp_path).read_text()
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:|#)", html), "an asset that is not inlined"
    assert "http://" not in html and "https://" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 4  # IP plot, training curves, evaluation grid, base samples
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    for text in ("Models side by side", "IP per category", "violence", "try-b", "Protocol of every number",
                 "ddim", "cost.json"):
        assert text in html, text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed")
def test_report_opens_in_headless_chromium_with_no_missing_asset(tiny_reference: Path, tmp_path: Path) -> None:
    path = _report(tiny_reference, tmp_path)
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*cmd, "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=180,
                         check=False)
    assert dom.returncode == 0, dom.stderr[-800:]
    n_images = len(re.findall(r"<img ", path.read_text()))
    assert f'data-images="ok:{n_images}"' in dom.stdout, re.findall(r"data-images=\"[^\"]*\"", dom.stdout)
    assert dom.stdout.count("<table") >= 5 and "try-b" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd, f"--screenshot={shot}", "--window-size=1200,2000", path.resolve().as_uri()],
                   capture_output=True, timeout=180, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
