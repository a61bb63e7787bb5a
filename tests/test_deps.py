"""DVC's promise, checked: every stage's `deps` cover every project module its command imports (directly or
transitively, lazy registry entries included), so a code change always re-runs the stages it can affect.

The import closure is read from the source with ``ast`` (``import`` statements anywhere, relative ones resolved,
every package ``__init__`` on the way, and ``"package.module:attribute"`` strings, which is how the registries
name their lazy entries). ``../shared/tools/deps_closure.py`` is a second, independent reader; this test does not
need it.
"""
from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, init_dvc, run_command, run_inline

MODULE_STRING = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(:[\w.]+)?$")
PACKAGES = ("stages", "safealign")


def module_file(root: Path, name: str) -> Path | None:
    """The project file of module ``name`` (a package's ``__init__.py``), or None if it is not the project's."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imported_files(root: Path, path: Path) -> set[Path]:
    """Project files that importing ``path`` may run: its imports, and each package above every one of them."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            names.add(node.value.split(":")[0])
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            f = module_file(root, ".".join(parts[:i]))
            if f is not None:
                files.add(f)
    return files


@functools.cache
def closure(root: Path, entry: str) -> frozenset[Path]:
    """Every project file that ``python -m <entry>`` may import."""
    parts = entry.split(".")
    todo = [f for i in range(1, len(parts) + 1) if (f := module_file(root, ".".join(parts[:i]))) is not None]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(imported_files(root, f) - seen)
    return frozenset(seen)


def stage_entries(dvc: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its command runs, its deps); a foreach stage once, with ${item} left in."""
    out = {}
    for name, stage in dvc["stages"].items():
        stage = stage.get("do", stage)
        m = re.search(r"(?:python|\$\{runtime\.launcher\}) -m ([\w.]+)", stage["cmd"])  # launcher: params
        assert m, f"stage {name}: command {stage['cmd']!r} does not run `python -m <module>`"
        out[name] = (m.group(1), [str(d) for d in stage.get("deps", [])])
    return out


def uncovered(root: Path, dvc: dict) -> dict[str, list[str]]:
    """stage -> project files its command imports that no dep (a file, or a folder above it) covers."""
    gaps = {}
    for name, (entry, deps) in stage_entries(dvc).items():
        covers = [root / d for d in deps]
        missing = sorted(str(f.relative_to(root)) for f in closure(root, entry)
                         if not any(f == c or c in f.parents for c in covers))
        if missing:
            gaps[name] = missing
    return gaps


def load_dvc(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def test_every_stage_deps_cover_its_import_closure() -> None:
    assert uncovered(ROOT, load_dvc()) == {}


def test_the_closure_follows_lazy_registry_entries() -> None:
    """The evaluate stage never imports the toy judge by an import statement: the detector registry names it."""
    files = {str(f.relative_to(ROOT)) for f in closure(ROOT, "stages.evaluate")}
    assert {"safealign/toyworld/judge.py", "safealign/toyworld/detect.py", "safealign/evaluation/detectors_real.py",
            "safealign/families/sd.py", "safealign/safetydpo/method.py", "stages/__init__.py"} <= files


def code_deps() -> list[tuple[str, str]]:
    """(stage, dep) for every dep line that names code."""
    return [(name, d) for name, (_, deps) in stage_entries(load_dvc()).items() for d in deps
            if d.startswith(PACKAGES)]


@pytest.mark.parametrize(("stage", "dep"), code_deps(), ids=lambda x: str(x))
def test_removing_any_code_dep_line_is_caught(stage: str, dep: str) -> None:
    dvc = load_dvc()
    entry = dvc["stages"][stage].get("do", dvc["stages"][stage])
    entry["deps"] = [d for d in entry["deps"] if d != dep]
    gaps = uncovered(ROOT, dvc)
    assert stage in gaps and any(g == dep or g.startswith(dep.rstrip("/") + "/") for g in gaps[stage])


def test_no_stage_imports_another_and_stages_stay_thin() -> None:
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        lines = path.read_text().splitlines()
        assert len(lines) <= 150, f"{path.name}: {len(lines)} lines; stage commands stay thin (library code goes to safealign/)"
        others = {f for f in imported_files(ROOT, path) if f.parent == ROOT / "stages" and f.name != "__init__.py"}
        assert not others, f"{path.name} imports another stage: {sorted(o.name for o in others)}"


def test_library_never_imports_a_stage() -> None:
    for path in sorted((ROOT / "safealign").rglob("*.py")):
        stages = {f for f in imported_files(ROOT, path) if (ROOT / "stages") in f.parents}
        assert not stages, f"{path.relative_to(ROOT)} imports stage code {sorted(map(str, stages))}"


def dvc_tracked(project: Path) -> list[str]:
    """Put a tiny project on which the pipeline ran under DVC (no git: it would track the outputs) and record what
    ran as the pipeline's state; returns the dvc command prefix."""
    run_inline(project, "train", "--category", "all")  # the one stage the tiny reference leaves out
    init_dvc(project, git=False)
    dvc = [sys.executable, "-m", "dvc"]
    run_command(project, [*dvc, "commit", "-f"])
    status = json.loads(run_command(project, [*dvc, "status", "--json"]).stdout)
    assert status == {"report": ["always changed"]}, status  # the report is re-run on every repro, by design
    return dvc


def test_editing_the_toy_detector_marks_evaluate_changed(reference_copy: Path) -> None:
    """After a function body in the toy detector module changes, `dvc status` lists evaluate as changed (before
    the rails, only base and prompts re-ran and evaluate was served stale)."""
    dvc = dvc_tracked(reference_copy)
    detect = reference_copy / "safealign/toyworld/detect.py"
    text = detect.read_text()
    assert "return ndimage.median_filter(img, size=(3, 3, 1), mode=\"nearest\")" in text
    detect.write_text(text.replace('mode="nearest")', 'mode="nearest").copy()'))
    changed = json.loads(run_command(reference_copy, [*dvc, "status", "--json"]).stdout)
    assert "evaluate" in changed, changed
    assert any("safealign" in json.dumps(entry) for entry in changed["evaluate"])


def test_switching_method_reruns_only_align_and_evaluate(reference_copy: Path) -> None:
    dvc = dvc_tracked(reference_copy)
    params = reference_copy / "params.yaml"
    params.write_text(params.read_text().replace("method: safetydpo", "method: none"))
    changed = json.loads(run_command(reference_copy, [*dvc, "status", "--json"]).stdout)
    # the experts and the merge stay cached; report is always re-run (it shows `dvc exp show` too); clean reads
    # `method` (it renders only for sc_dpo) and re-runs in a second to the same empty set
    assert sorted(changed) == ["align", "attack", "clean", "evaluate", "report"], changed


def test_shared_reader_agrees_where_it_is_available() -> None:
    """The second reader (shared/tools/deps_closure.py, beside a developer's checkout) finds no gap either."""
    tool = ROOT.parent / "shared" / "tools" / "deps_closure.py"
    if not tool.exists():
        pytest.skip("shared/ is not beside this checkout (a user's clone)")
    done = subprocess.run([sys.executable, str(tool), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
