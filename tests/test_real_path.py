"""The real path, as a user with weights walks it: tiny random-weight diffusers folders for sd15, sd21 and sdxl
written to disk in the published layout, the whole `dvc repro` on each (training pairs from a CoProV2-layout file,
`prompts.backend=file`), the merged LoRA loaded into the matching diffusers pipeline; and the checks that catch a
broken model folder at `base` (fp16-only weights, a tokenizer that does not fit its text encoder), the refusal of
the toy `grammar` prompts with a real family, the `++model.options` override, and one-line user errors.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, assert_dvc_clean, init_dvc, make_project, run_inline, stage_env

REAL = ("sd15", "sd21", "sdxl")
CATEGORIES = ["hate", "violence"]


# ------------------------------------------------------------------------------------------------ fixtures on disk
def write_diffusers_folder(family: str, folder: Path, variant: str | None = None, seed: int = 0) -> Path:
    """A tiny random-weight diffusers folder in the published layout: model_index.json, components with
    safetensors weights (``*.<variant>.safetensors`` with ``variant``), CLIP tokenizer files (vocab.json,
    merges.txt, tokenizer_config.json, special_tokens_map.json: what the released repositories ship)."""
    from safealign.families import get_family

    fam = get_family(family).build_random("tiny", seed=seed)
    fam.save_components(folder)
    for name, tok in zip(fam.tokenizer_names(), fam.tokenizers, strict=True):
        sub = folder / name
        cfg = json.loads((sub / "tokenizer_config.json").read_text())
        cfg.pop("backend", None)
        shutil.rmtree(sub)
        sub.mkdir()
        (sub / "vocab.json").write_text(json.dumps(tok.get_vocab(), ensure_ascii=False))
        (sub / "merges.txt").write_text("#version: 0.2\n")  # the byte tokenizer has no merges
        (sub / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        specials = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        (sub / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    if variant:
        for f in folder.rglob("*.safetensors"):
            f.rename(f.with_name(f"{f.name.removesuffix('.safetensors')}.{variant}.safetensors"))
    return folder


def write_coprov2_pairs(path: Path, per_category: int = 6) -> Path:
    """A CoProV2-layout training CSV (``prompt,image,category``; ``u_``/``s_`` rows of each pair) for the test
    categories, with what the published file has: a repeated row, a pair listed under two categories, and
    category spellings to normalise."""
    spelling = {"hate": "Hate", "violence": "violent"}
    scenes = ["in a park", "on a bridge", "at a market", "in a classroom", "on a beach", "in a kitchen",
              "at a station", "in a forest"]
    rows = []
    for c, cat in enumerate(CATEGORIES):
        for i in range(per_category):
            pid = f"idx_{c * 100 + i:07d}_0"
            where = scenes[i % len(scenes)]
            rows.append((f"a {cat} scene with people {where}, number {i}", f"u_{pid}.jpg", spelling[cat]))
            rows.append((f"a friendly scene with people {where}, number {c * 100 + i}", f"s_{pid}.jpg",
                         spelling[cat]))
    rows.append(rows[0])  # published files repeat rows
    rows.append((rows[0][0], rows[0][1], "Violence"))  # and list a pair under a second category
    rows.append((rows[1][0], rows[1][1], "Violence"))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image", "category"])
        w.writerows(rows)
    return path


def sd_overrides(family: str, weights: Path, pairs: Path) -> dict:
    """A real family at the smallest counts every stage accepts: two categories, two steps everywhere."""
    return {"model.family": family, "model.path": str(weights), "categories": CATEGORIES,
            "prompts.backend": "file", "prompts.options": {"path": str(pairs), "test_share": 0.34},
            "prompts.train_per_category": 4, "prompts.test_per_category": 1, "prompts.benign": 2,
            "prompts.calibration_per_category": 1, "sampling.steps": 2, "sampling.batch_size": 8,
            "train.steps": 2, "train.batch_size": 2, "train.anchor_batch_size": 2, "sc_dpo.cost_steps": 5,
            "evaluate.grid_rows": 2, "merge.rank": 4, "sc_dpo.clean_prompts": 2, "users.seen": 2, "users.unseen": 2,
            "psa.eval_users": 1, "psa.eval_prompts_per_category": 1, "psa.steps": 2, "psa.batch_size": 2,
            "psa.pairs_per_user": 1, "attack.prompts_per_category": 1, "attack.seeds_per_prompt": 1}


def only_categories(project: Path, categories: list[str]) -> None:
    """dvc.yaml's merge, attack and report stages list the seven experts (or their logs): keep those of
    ``categories``."""
    d = yaml.safe_load((project / "dvc.yaml").read_text())
    for stage in d["stages"].values():  # merge and attack (its target may be an expert)
        if "deps" in stage:
            stage["deps"] = [x for x in stage["deps"] if not x.startswith(("models/experts/", "metrics/train/"))
                             or Path(x).stem in [*categories, "all"]]
    (project / "dvc.yaml").write_text(yaml.safe_dump(d, sort_keys=False))


# ------------------------------------------------------------------------------------------ the whole pipeline
@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess, float]]:
    """`dvc repro` of the whole pipeline in a scratch git + DVC repository per family, the three at once."""
    root = tmp_path_factory.mktemp("real")
    pairs = write_coprov2_pairs(root / "coprov2_train.csv")
    procs = {}
    for family in REAL:
        weights = write_diffusers_folder(family, root / family / "weights")
        project = make_project(root / family / "project", sd_overrides(family, weights, pairs))
        only_categories(project, CATEGORIES)
        init_dvc(project)
        procs[family] = (project, time.monotonic(), subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env=stage_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    runs = {}
    for family, (project, t0, proc) in procs.items():
        out, _ = proc.communicate(timeout=2400)
        runs[family] = (project, subprocess.CompletedProcess(proc.args, proc.returncode, out, ""),
                        time.monotonic() - t0)
    return runs


@pytest.mark.slow  # three whole `dvc repro` runs at once: about 2-3 min of stage start-up (imports) on 2 cores
@pytest.mark.parametrize("family", REAL)
def test_dvc_repro_runs_each_sd_family_end_to_end(sd_runs: dict, family: str) -> None:
    project, done, _ = sd_runs[family]
    assert done.returncode == 0, done.stdout[-4000:]
    for out in ("plots/base_samples.png", "metrics/base.json", "metrics/prompts.json", "metrics/evaluate.json",
                "models/merged/lora.safetensors", "models/aligned/lora.safetensors", "plots/eval_grid.png"):
        assert (project / out).is_file(), out
    base = json.loads((project / "metrics/base.json").read_text())
    assert base["prediction_type"] == ("v_prediction" if family == "sd21" else "epsilon")
    assert base["resolution"] == 64  # the tiny UNet's sample_size (8) times the VAE factor (8)
    assert [t["vocab"] for t in base["tokenizers"]] == [514] * (2 if family == "sdxl" else 1)
    prompts = json.loads((project / "metrics/prompts.json").read_text())
    assert prompts["backend"] == "file" and prompts["leaks"]["test"]["overlaps"] == 0
    assert prompts["source"]["duplicate_rows"] == 1 and prompts["source"]["multi_label_pairs"] == 1
    assert prompts["pairs"]["train"] >= 4 and prompts["pairs"]["test"] >= 2
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=stage_env(),
                            capture_output=True, text=True, check=True)
    assert_dvc_clean(status.stdout)

    import torch

    from safealign.families import get_family

    fam = get_family(family).load(project.parent / "weights")
    pipe = fam.pipeline()
    noise = fam.initial_noise([3])
    kw = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "np"}
    before = pipe("a red cat", latents=noise.clone(), **kw).images
    pipe.load_lora_weights(str(project / "models/merged/lora.safetensors"))
    after = pipe("a red cat", latents=noise.clone(), **kw).images
    assert before.shape == after.shape == (1, 64, 64, 3)
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after))  # the LoRA changes the render


# ------------------------------------------------------------------------------------- a broken model folder
def base_params(tmp_path: Path, family: str, weights: Path, **extra) -> Path:
    project = make_project(tmp_path / "project", {"model.family": family, "model.path": str(weights),
                                                   "sampling.steps": 1, **extra})
    return project


def test_fp16_only_weights_fail_at_base_naming_the_variant_option(tmp_path: Path) -> None:
    from safealign.core.errors import MissingWeights
    from safealign.core.params import load_params
    from safealign.families import get_family

    weights = write_diffusers_folder("sd15", tmp_path / "w", variant="fp16")
    project = base_params(tmp_path, "sd15", weights)
    with pytest.raises(MissingWeights, match=re.escape("-S '++model.options={variant: fp16}'")):
        run_inline(project, "base")
    # with the variant named, the same folder passes base and loads
    params = load_params(project / "params.yaml", {"model.options": {"variant": "fp16"}})
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in get_family("sd15").check_weights(params.model)
    fam = get_family("sd15").load(weights, options={"variant": "fp16"})
    assert fam.check_tokenizers()[0]["vocab"] == 514
    # and a variant that is not there is named too
    bad = load_params(project / "params.yaml", {"model.options": {"variant": "bf16"}})
    with pytest.raises(MissingWeights, match="no bf16 .safetensors weights.*model.options.variant to one of: fp16"):
        get_family("sd15").check_weights(bad.model)


@pytest.mark.parametrize("damage", ["config_only", "other_vocab"])
def test_a_tokenizer_that_does_not_fit_its_text_encoder_fails_at_base(tmp_path: Path, damage: str) -> None:
    """A tokenizer/ with only its config loads as a 2-token tokenizer (every prompt the same ids); a vocabulary
    of another size indexes past the embedding or leaves it unused. Both fail at `base`, naming the folder."""
    from safealign.core.errors import MissingWeights

    weights = write_diffusers_folder("sdxl", tmp_path / "w")
    tok = weights / "tokenizer_2"
    if damage == "config_only":
        for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (tok / f).unlink()
    else:
        vocab = json.loads((tok / "vocab.json").read_text())
        vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(3)})
        (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    project = base_params(tmp_path, "sdxl", weights)
    expected = "2 tokens" if damage == "config_only" else "517 tokens"
    with pytest.raises(MissingWeights, match=rf"tokenizer_2/ has {expected} but its text encoder embeds 514"):
        run_inline(project, "base")
    assert not (project / "metrics/base.json").exists()


def test_round_trip_catches_a_tokenizer_of_the_right_size_that_maps_text_wrongly(tmp_path: Path) -> None:
    from safealign.core.errors import MissingWeights
    from safealign.families import get_family

    weights = write_diffusers_folder("sd15", tmp_path / "w")
    vocab = json.loads((weights / "tokenizer/vocab.json").read_text())
    vocab["unused</w>"] = vocab.pop("a</w>")  # same size and special tokens, but "a" now reads as unknown
    (weights / "tokenizer/vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    fam = get_family("sd15").load(weights)
    with pytest.raises(MissingWeights, match="does not round-trip the test prompt"):
        fam.check_tokenizers()


def test_a_user_error_at_base_is_one_line_on_stderr_with_status_2(tmp_path: Path) -> None:
    weights = write_diffusers_folder("sd15", tmp_path / "w", variant="fp16")
    project = base_params(tmp_path, "sd15", weights)
    done = subprocess.run([sys.executable, "-m", "stages.base"], cwd=project, env=stage_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2
    lines = [x for x in done.stderr.splitlines() if x.startswith("error:") or "Traceback" in x]
    assert len(lines) == 1 and lines[0].startswith("error: model.path=") and "model.options.variant" in lines[0]


def test_sd_base_writes_a_sample_grid_and_reports_the_family(tmp_path: Path) -> None:
    """dvc.yaml declares plots/base_samples.png for every family: an SD family writes one too."""
    weights = write_diffusers_folder("sd21", tmp_path / "w")
    project = base_params(tmp_path, "sd21", weights)
    run_inline(project, "base")
    from PIL import Image

    with Image.open(project / "plots/base_samples.png") as im:
        assert im.size[1] > 4 * 96  # four sample rows
    base = json.loads((project / "metrics/base.json").read_text())
    assert base["prediction_type"] == "v_prediction" and base["resolution"] == 64 and base["samples"] == 4
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["base"]
    assert {next(iter(p)) for p in declared.get("plots", [])} <= {"plots/base_samples.png"}


def test_grammar_prompts_with_a_real_family_are_refused(tmp_path: Path) -> None:
    from safealign.core.errors import ParamsError

    project = make_project(tmp_path / "project", {"model.family": "sd15", "model.path": "/nowhere"})
    with pytest.raises(ParamsError, match=r"prompts.backend: 'grammar' writes the toy world's captions.*"
                                          r"prompts.backend=file"):
        run_inline(project, "prompts")
    assert not (project / "data/prompts/pairs.parquet").exists()


# ---------------------------------------------------------------------------------------------- the documentation
def test_documented_options_overrides_use_the_form_dvc_accepts(tmp_path: Path) -> None:
    """`dvc exp run -S 'model.options={...}'` fails in DVC (`Could not override 'model.options'`, while the
    value is the `{}` default); `++model.options={...}` works. The docs show the working form,
    and both forms behave as said through DVC's own override code."""
    from dvc.utils.hydra import apply_overrides

    for doc in (ROOT / "docs").glob("*.md"):
        shown = [line for line in doc.read_text().splitlines() if not re.search(r"refuse|fails", line)]  # warnings
        bad = [line for line in shown if re.search(r"-S '(?!\+\+)[\w.]*options=\{", line)]
        assert not bad, f"{doc.name}: {bad}"
    assert "-S '++model.options={" in (ROOT / "docs/real_models.md").read_text()
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    with pytest.raises(Exception) as refused:  # DVC wraps hydra's error; its cause says why
        apply_overrides(str(params), ["model.options={variant: fp16}"])
    assert "Could not override 'model.options'" in str(refused.value.__cause__)
    apply_overrides(str(params), ["++model.options={variant: fp16}"])
    assert yaml.safe_load(params.read_text())["model"]["options"] == {"variant": "fp16"}
