"""A catalogue of bad inputs: each gets an error naming the file, the row or the key, and nothing written
before is lost (the outputs already there are byte-for-byte unchanged after the failure).

Stages run in this process on a private copy of the tiny reference project (``reference_copy``), with one
input damaged. The catalogue: 35 bad inputs, one test each, all answered by a named error.

params.yaml (9), through the stage that reads the key; the error starts ``params.yaml: <key>:``
  1 an unknown key  2 a wrong type  3 beta <= 0  4 an unknown merge rule  5 an unknown prompt backend
  6 an unknown model family  7 a concept naming an unknown colour  8 ... an unknown shape  9 an unknown category
data (2)
 10 ``train --category`` for a category with no training pairs  11 ... for a name that is not a category
tables (7)
 12 pairs table without a column  13 an empty pairs file  14 a pairs file that is not Parquet
 15 duplicate pair ids (safealign.prompts.schema.check_pairs)
 16 CSV import: text that is not UTF-8 (file, row and line)  17 ... an empty file  18 ... a missing column
images (3)
 19 a corrupt PNG among the rendered images  20 a rendered PNG of the wrong size  21 a .png that is no image
LoRA files (8)
 22 an adapter missing weights the model needs (evaluate)  23 a lora_A without its lora_B (merge)
 24 tensors of another rank than the metadata says (merge)  25 metadata without the rank
 26, 27 a pickle-based .pt / .bin  28 pickle bytes named .safetensors  29 ... as an expert (merge):
 refused, and never unpickled (a trap object that would create a file when unpickled proves it)
LLM replies (6), through the recipe's reply handling (safealign/prompts/recipe.py): counted under a named reason
 30 empty  31 blank  32 a refusal  33 garbage  34 a preamble and nothing else  35 no reply at all
 (a run where nothing survives names the reasons and the journal: tests/test_llm_prompts.py)
"""
from __future__ import annotations

import contextlib
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, file_hashes, run_inline, write_params
from PIL import Image
from safetensors.torch import save_file

from safealign.core.params import CATEGORIES, ParamsError
from safealign.families.lora import read_lora, save_lora
from safealign.families.rendering import load_png
from safealign.prompts.schema import check_pairs


@contextlib.contextmanager
def unchanged(project: Path, globs: tuple[str, ...]) -> Iterator[None]:
    """The files matching ``globs`` must be byte-identical (and all still there) at the end."""
    before = file_hashes(project, *globs)
    assert before, f"nothing to protect under {globs}"
    yield
    assert file_hashes(project, *globs) == before, "a failed run changed earlier outputs"


def fails(project: Path, stage_args: tuple[str, ...], error: type[BaseException], pattern: str,
          protect: tuple[str, ...]) -> None:
    """Run the stage; it must raise ``error`` matching ``pattern`` and leave ``protect`` unchanged."""
    with unchanged(project, protect), pytest.raises(error, match=pattern):
        run_inline(project, *stage_args)


EXPERTS = ("models/experts/*.safetensors", "metrics/train/*")
RENDERED = ("data/render/**/*",)
PROMPTS = ("data/prompts/*.parquet", "metrics/prompts.json")


# ---------------------------------------------------------------------------------------------- params
PARAMS_CASES = {
    "unknown_key": ({"train.betta": 1.0}, ("train", "--category", "hate"), EXPERTS, r"train\.betta: unknown key"),
    "wrong_type": ({"train.steps": "many"}, ("train", "--category", "hate"), EXPERTS,
                   r"train\.steps: Input should be a valid integer"),
    "beta_not_positive": ({"train.beta": 0}, ("train", "--category", "hate"), EXPERTS,
                          r"train\.beta: Input should be greater than 0"),
    "unknown_merge_rule": ({"merge.method": "average"}, ("merge",), ("models/merged/*", "metrics/merge.json"),
                           r"merge\.method: unknown merge rule 'average'; allowed: .*ties"),
    "unknown_backend": ({"prompts.backend": "gpt9"}, ("prompts",), PROMPTS,
                        r"prompts\.backend: unknown prompt backend 'gpt9'; allowed: .*grammar"),
    "unknown_family": ({"model.family": "sd99"}, ("base",), ("models/base/*", "metrics/base.json"),
                       r"model\.family: unknown model family 'sd99'; allowed: .*toy"),
    "unknown_colour": ({"toy.concepts.violence.unsafe": "crimson"}, ("prompts",), PROMPTS,
                       r"toy\.concepts\.violence: unsafe: 'crimson' is not a toy color; allowed: red"),
    "unknown_shape": ({"toy.concepts.violence": {"attribute": "shape", "unsafe": "hexagon", "safe": "circle"}},
                      ("prompts",), PROMPTS, r"toy\.concepts\.violence: unsafe: 'hexagon' is not a toy shape"),
    "unknown_category": ({"categories": ["hate", "gore"]}, ("render",), RENDERED,
                         r"categories: unknown category 'gore'; allowed: hate"),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params_name_the_file_and_key(reference_copy: Path, case: str) -> None:
    overrides, stage, protect, pattern = PARAMS_CASES[case]
    write_params(reference_copy, overrides)
    fails(reference_copy, stage, ParamsError, r"^params\.yaml: " + pattern, protect)


# ------------------------------------------------------------------------------------------------ data
def test_category_without_training_pairs(reference_copy: Path) -> None:
    manifest = reference_copy / "data/render/manifest.parquet"
    table = pd.read_parquet(manifest)
    table["categories"] = [[c for c in cats if c != "hate"] or ["violence"] for cats in table.categories]
    table.to_parquet(manifest, index=False)  # same rows in the same order: only `hate` has no pairs now
    fails(reference_copy, ("train", "--category", "hate"), ValueError,
          r"category 'hate' has no training pairs in data/render/manifest\.parquet", EXPERTS)


def test_category_not_in_params(reference_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(reference_copy, ("train", "--category", "gore"), SystemExit, "2", EXPERTS)
    assert "--category 'gore': not in params.yaml categories" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- tables
PAIRS = "data/prompts/pairs.parquet"


def _drop_split(path: Path) -> None:
    pd.read_parquet(path).drop(columns=["split"]).to_parquet(path, index=False)


@pytest.mark.parametrize("damage,pattern", [
    (_drop_split, r"missing column\(s\) \['split'\]"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("pair_id,unsafe_prompt\np1,a red circle\n"), "not a readable Parquet table"),
], ids=["missing_column", "empty_file", "not_parquet"])
def test_bad_pairs_table_names_the_file(reference_copy: Path, damage, pattern: str) -> None:
    damage(reference_copy / PAIRS)
    fails(reference_copy, ("render",), ValueError, re.escape(PAIRS) + ": " + pattern, RENDERED)


def test_duplicate_pair_ids_name_the_id() -> None:
    pairs = pd.DataFrame({"pair_id": ["p1", "p2", "p1"], "categories": [["hate"]] * 3, "concept": "c",
                          "unsafe_prompt": ["a", "b", "c"], "safe_prompt": ["d", "e", "f"], "split": "train",
                          "seed": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"^imported\.parquet: duplicate pair_id 'p1'"):
        check_pairs(pairs, "imported.parquet")


@pytest.mark.parametrize("content,pattern", [
    ("prompt,image,category\nA calm lake,u_1.jpg,Hate\n".encode() + b"A caf\xe9 at night,s_1.jpg,Hate\n",
     r"bad\.csv: row 2 \(line 3\): not UTF-8"),
    (b"", r"bad\.csv: empty file"),
    (b"text,image,category\nA calm lake,u_1.jpg,Hate\n", r"bad\.csv: missing column 'prompt'"),
], ids=["not_utf8", "empty", "missing_column"])
def test_bad_csv_import_names_file_and_row(reference_copy: Path, capsys: pytest.CaptureFixture[str],
                                           content: bytes, pattern: str) -> None:
    pytest.importorskip("safealign.prompts.importers")
    (reference_copy / "bad.csv").write_bytes(content)
    shutil.copy2(reference_copy / PAIRS, reference_copy / "imported.parquet")  # an earlier import
    args = ("prompts", "import", "--format", "coprov2", "--input", "bad.csv", "--output", "imported.parquet")
    fails(reference_copy, args, SystemExit, "2", ("imported.parquet",))
    assert re.search(r"^error: " + pattern, capsys.readouterr().err, re.M)


# ---------------------------------------------------------------------------------------------- images
IMAGE = "data/render/images/p00003_s.png"


@pytest.mark.parametrize("damage,pattern", [
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "not a readable PNG"),
    (lambda p: Image.new("RGB", (16, 16), "red").save(p), "image is 16x16, expected 32x32"),
], ids=["corrupt_png", "wrong_size"])
def test_bad_rendered_image_names_the_file(reference_copy: Path, damage, pattern: str) -> None:
    damage(reference_copy / IMAGE)
    fails(reference_copy, ("render",), ValueError, re.escape(IMAGE) + ": " + pattern, RENDERED)


def test_load_png_names_a_file_that_is_no_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable PNG"):
        load_png(path)
    assert path.read_text() == "not an image"


# ------------------------------------------------------------------------------------------ LoRA files
def _resave(path: Path, edit_tensors=None, edit_meta=None) -> None:
    sd, meta = read_lora(path)
    sd = edit_tensors(sd) if edit_tensors else sd
    meta = edit_meta(meta) if edit_meta else meta
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def test_lora_missing_weights_the_adapter_needs(reference_copy: Path) -> None:
    aligned = reference_copy / "models/aligned/lora.safetensors"  # the merged LoRA as `align` hands it to evaluate
    sd, meta = read_lora(aligned)
    keep = sorted({k.split(".lora_")[0] for k in sd})[:2]  # two modules of many
    save_lora(aligned, {k: v for k, v in sd.items() if k.split(".lora_")[0] in keep}, int(meta["rank"]),
              float(meta["alpha"]), meta["targets"].split(","))
    fails(reference_copy, ("evaluate",), ValueError,
          re.escape(str(Path("models/aligned/lora.safetensors"))) + r": LoRA file lacks \d+ weights",
          ("data/eval/**/*", "metrics/evaluate.json"))


MERGED = ("models/merged/*", "metrics/merge.json")


def test_lora_a_without_its_b(reference_copy: Path) -> None:
    hate = reference_copy / "models/experts/hate.safetensors"
    _resave(hate, edit_tensors=lambda sd: {k: v for k, v in sd.items() if k != sorted(sd)[1]})  # a lora_B
    fails(reference_copy, ("merge",), ValueError,
          r"models/experts/hate\.safetensors: LoRA keys are incomplete", MERGED)


def test_lora_of_another_rank_than_its_metadata(reference_copy: Path) -> None:
    _resave(reference_copy / "models/experts/hate.safetensors", edit_meta=lambda m: {**m, "rank": "8"})
    fails(reference_copy, ("merge",), ValueError,
          r"models/experts/hate\.safetensors: unet\..*lora_A\.weight has shape \(4, \d+\), not rank 8", MERGED)


def test_lora_without_rank_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(4, 8), "unet.a.lora_B.weight": torch.zeros(8, 4)}, str(path),
              metadata={"alpha": "4", "targets": "to_q"})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": LoRA metadata lacks 'rank'"):
        read_lora(path)


class Trap:
    """Unpickling this object creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_pickle_lora_refused_without_unpickling(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(pickle.dumps({"unet.a.lora_A.weight": Trap(marker)}))
    pattern = ("not a readable safetensors file" if suffix == ".safetensors"
               else r"LoRA weights load from \.safetensors only \(pickle-based files are refused\)")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + pattern):
        read_lora(path)
    assert not marker.exists(), "the file was unpickled"
    pickle.loads(path.read_bytes())  # the trap works: unpickling would have run code
    assert marker.exists()


def test_pickle_expert_refused_by_merge(reference_copy: Path) -> None:
    marker = reference_copy / "unpickled"
    (reference_copy / "models/experts/shocking.safetensors").write_bytes(pickle.dumps(Trap(marker)))
    fails(reference_copy, ("merge",), ValueError,
          r"models/experts/shocking\.safetensors: not a readable safetensors file", MERGED)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- LLM replies
@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"), ("   \n", "empty_reply"),
    ("I'm sorry, but I can't help with that request.", "refusal"),
    ("Sure!", "unparseable"), ("Here are the prompts:\n\n", "unparseable"),
    (None, "llm_error"),
], ids=["empty", "blank", "refusal", "garbage", "preamble_only", "no_reply"])
def test_bad_llm_reply_is_rejected_by_name(tmp_path: Path, reply: str | None, reason: str) -> None:
    llm_prompts = pytest.importorskip("safealign.prompts.recipe")
    opts = llm_prompts.load_options({"journal_dir": str(tmp_path)})
    tax = llm_prompts.load_taxonomy(ROOT / "data/taxonomy.yaml", CATEGORIES)
    recipe = llm_prompts.Recipe(llm=_NoLLM(), opts=opts, taxonomy=tax, encoder=None, seed=0)
    assert recipe.items("unsafe", reply, limit=4) == []
    assert dict(recipe.rejected) == {f"unsafe_{reason}": 1}


class _NoLLM:
    model = "none"

    def generate(self, requests, on_reply=None):  # pragma: no cover - items() never asks
        raise AssertionError("not asked")
