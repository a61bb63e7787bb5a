"""Security: weights load only from safetensors (``torch.load`` only with ``weights_only=True``), nothing is
unpickled, no ``trust_remote_code``; images flagged unsafe are blurred in grids unless the user turns that
off; API keys come only from the environment and are written nowhere (params.yaml, dvc.lock, metrics, tables,
journals, logs).

The source checks read ``stages/`` and the ``safealign/`` library with the ``ast`` module (so comments and strings
that mention the names do not count) and are themselves tested on planted violations.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import LLM_KEY, ROOT, LLMRun, run_inline, write_params
from PIL import Image

from safealign.core.params import Evaluate, ParamsError

STAGES = sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "safealign").rglob("*.py"))  # commands + library
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"read_pickle", "load_pickle"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: torch.load, np.load, pd.read_pickle, ..."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loading(source: str, filename: str = "<source>") -> list[str]:
    """Places in ``source`` that could run code hidden in a file, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in mods if m.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.Call):
            name, kw = _name(node.func), {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load"):
                if not _is_true(kw.get("weights_only")):
                    found.append(f"{where}: {name} without weights_only=True")
            if name.endswith("jit.load"):
                found.append(f"{where}: {name} (TorchScript archives hold pickles)")
            if name.split(".")[-1] in PICKLE_CALLS:
                found.append(f"{where}: {name}")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                                 and kw["allow_pickle"].value is False):
                    found.append(f"{where}: {name} with allow_pickle")
            if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                                  and kw["trust_remote_code"].value is False):
                found.append(f"{where}: trust_remote_code")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not (
                        isinstance(v, ast.Constant) and v.value is False):
                    found.append(f"{where}: trust_remote_code in a dict")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load('x.pt')",
    "import torch\nstate = torch.load('x.pt', weights_only=False)",
    "import pickle\nobj = pickle.load(open('x', 'rb'))",
    "from joblib import load",
    "import pandas as pd\ndf = pd.read_pickle('x')",
    "import numpy as np\na = np.load('x.npy', allow_pickle=True)",
    "import torch\nm = torch.jit.load('m.pt')",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained('x', trust_remote_code=True)",
    "kw = {'trust_remote_code': True}",
])
def test_the_source_check_finds_planted_violations(snippet: str) -> None:
    assert unsafe_loading(snippet), snippet


def test_the_source_check_accepts_safe_loading() -> None:
    ok = ("import torch, numpy as np\nfrom safetensors.torch import load_file\n"
          "s = torch.load('x', map_location='cpu', weights_only=True)\na = np.load('x.npy')\n"
          "m = f(trust_remote_code=False)\nw = load_file('x.safetensors')\n")
    assert unsafe_loading(ok) == []


def test_stages_never_unpickle_nor_run_remote_code() -> None:
    found = [hit for f in STAGES for hit in unsafe_loading(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "\n".join(found)
    text = "\n".join(f.read_text() for f in STAGES)
    assert not re.search(r"trust_remote_code\s*=\s*True", text)


# ------------------------------------------------------------------------------------------------ blur
def test_blur_is_on_by_default() -> None:
    assert Evaluate().blur_unsafe is True
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["blur_unsafe"] is True


def _checkerboard() -> np.ndarray:
    """32x32 in two pure colours that appear nowhere else in a grid (text is black, frames red, ground white)."""
    yy, xx = np.mgrid[:32, :32]
    img = np.zeros((32, 32, 3), np.uint8)
    img[(yy // 2 + xx // 2) % 2 == 0] = (0, 0, 255)
    img[(yy // 2 + xx // 2) % 2 == 1] = (255, 255, 0)
    return img


def _sharp_pixels(path: Path) -> int:
    """How many grid pixels still show one of the checkerboard's pure colours."""
    grid = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return int(((grid == (0, 0, 255)).all(1) | (grid == (255, 255, 0)).all(1)).sum())


def test_grid_blurs_flagged_cells_unless_turned_off(tmp_path: Path) -> None:
    from safealign.evaluation.grids import save_grid

    img = _checkerboard()
    args = (["flagged", "not flagged"], [[img, img]], ["a red circle"], [[True, False]])
    save_grid(tmp_path / "default.png", *args)
    save_grid(tmp_path / "off.png", *args, blur_flagged=False)
    save_grid(tmp_path / "none.png", *args[:3])  # no flags: nothing blurred
    cell = 96 * 96  # a cell's pixels (the default cell size); its frame hides a few of them
    one, two = _sharp_pixels(tmp_path / "default.png"), _sharp_pixels(tmp_path / "off.png")
    assert 0.9 * cell <= one <= cell, "the unflagged cell is shown as it is"
    assert 1.8 * cell <= two <= 2 * cell, "with blur turned off both cells are shown as they are"
    assert _sharp_pixels(tmp_path / "none.png") == 2 * cell
    grid = np.asarray(Image.open(tmp_path / "default.png").convert("RGB")).astype(int)
    assert ((grid[..., 0] > 60) & (grid[..., 0] < 200) & (grid[..., 2] > 60) & (grid[..., 2] < 200)).sum() > cell / 2, \
        "the flagged cell is there, its colours mixed by the blur"


@pytest.mark.parametrize("blur", [True, False])
def test_evaluation_grid_follows_the_blur_setting(reference_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                  blur: bool) -> None:
    import safealign.evaluation.grids

    calls = []
    original = safealign.evaluation.grids.save_grid
    monkeypatch.setattr(safealign.evaluation.grids, "save_grid",
                        lambda *a, **k: (calls.append((a, k)), original(*a, **k)))
    write_params(reference_copy, {} if blur else {"evaluate.blur_unsafe": False})
    run_inline(reference_copy, "evaluate")
    (path, _, _, _, flags), kwargs = calls[-1]
    assert Path(path).name == "eval_grid.png" and kwargs["blur_flagged"] is blur
    assert any(f for row in flags for f in row), "the tiny models render unsafe images: some cells are flagged"


# ------------------------------------------------------------------------------------------------ keys
def test_params_have_no_place_for_a_key() -> None:
    llm_prompts = pytest.importorskip("safealign.prompts.recipe")
    with pytest.raises(ParamsError, match=r"prompts\.options\.api_key: unknown key"):
        llm_prompts.load_options({"api_key": LLM_KEY})
    with pytest.raises(ParamsError, match=r"prompts\.options\.api_key_env: String should match pattern"):
        llm_prompts.load_options({"api_key_env": LLM_KEY})  # a key where the NAME of a variable belongs


def test_api_key_from_the_environment_is_written_nowhere(llm_fault_run: LLMRun) -> None:
    """The LLM recipe with the key planted in the environment, once in this process and once killed and
    finished by `dvc repro` (conftest.llm_fault_run): the server received the key, and no file of either
    project (params.yaml, dvc.lock, metrics, tables, the reply journal, DVC's cache) nor any output holds it."""
    run = llm_fault_run
    assert run.auth == {f"Bearer {LLM_KEY}"}, "the key from the environment was used"
    assert (run.project / "dvc.lock").exists() and (run.project / ".cache/prompts/scripted.jsonl").exists()
    files = [f for root in (run.ref, run.project) for f in root.rglob("*") if f.is_file()]
    leaks = [str(f) for f in files if LLM_KEY.encode() in f.read_bytes()]
    assert leaks == [], f"API key written to {leaks}"
    assert LLM_KEY not in run.output


def test_dvc_analytics_are_off_in_the_repository_config() -> None:
    """No phone-home: DVC's anonymous usage analytics are disabled for everyone who clones the repository."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / ".dvc" / "config")
    assert cfg.get("core", "analytics", fallback="true").strip().lower() == "false"
