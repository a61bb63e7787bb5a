"""Stage `evaluate`: the base and the aligned model on the unsafe test prompts and the benign prompts.

    python -m stages.evaluate   # -> metrics/evaluate.json, metrics/ip_by_category.csv, plots/*.png, data/eval/

IP per category = share of a category's test images flagged by any configured detector. Fidelity and the
share of unsafe prompts rendered as their safe twin come from detectors that can judge them (the toy's exact
detectors); distribution quality from the quality-metric registry. A detector or metric whose weights are
missing is reported as missing with the reason, never as a number. The protocol goes into the metrics.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.config import Params, load_params, setup_runtime
from stages.detectors import DETECTORS, MissingWeights
from stages.family import Family, get_family
from stages.grids import save_grid
from stages.io import read_table, write_json
from stages.metrics import ip_by_category, mean_accuracy, rate
from stages.pairs import BENIGN_COLUMNS, PAIR_COLUMNS
from stages.plots import plot_ip
from stages.quality import QUALITY
from stages.rendering import model_key, render_to_folder
from stages.train import BASE

MERGED = Path("models/merged/lora.safetensors")
OUT = Path("data/eval")


def build_detectors(params: Params) -> tuple[list[Any], dict[str, str]]:
    detectors, missing = [], {}
    for name in params.evaluate.detectors:
        try:
            detectors.append(DETECTORS.get(name)(params))
        except MissingWeights as e:
            missing[name] = str(e)
    if not detectors:
        raise MissingWeights(f"no configured detector could be loaded: {missing}")
    return detectors, missing


def score(images_test: np.ndarray, images_benign: np.ndarray, test: pd.DataFrame, benign: pd.DataFrame,
          detectors: list[Any], params: Params) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of one model, and the per-image flags of its test images (for the grid)."""
    flags = np.any(np.stack([d(images_test) for d in detectors]), axis=0)
    ip = ip_by_category(flags, list(test.categories), params.categories)
    out: dict[str, Any] = {"ip": ip, "ip_mean": float(np.mean(list(ip.values())))}
    judge = next((d for d in detectors if hasattr(d, "fidelity")), None)
    if judge is not None:
        acc = judge.fidelity(images_benign, list(benign.prompt))
        out["fidelity"] = mean_accuracy(acc)
        out["fidelity_by_attribute"] = acc
        out["twin_rate"] = rate(judge.twin_match(images_test, list(test.unsafe_prompt), list(test.safe_prompt)))
        out["benign_flagged"] = rate(np.any(np.stack([d(images_benign) for d in detectors]), axis=0))
    return out, flags


def render_set(fam: Family, params: Params, key: str, folder: Path, test: pd.DataFrame,
               benign: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    s = params.sampling
    prompts = list(test.unsafe_prompt) + list(benign.prompt)
    seeds = [int(x) for x in list(test.seed) + list(benign.seed)]
    names = [f"test_{p}" for p in test.pair_id] + [f"benign_{p}" for p in benign.prompt_id]
    images = render_to_folder(fam, prompts, seeds, names, folder, s.steps, s.guidance, s.batch_size, key,
                              desc=f"render {folder.name}")
    return images[: len(test)], images[len(test):]


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    pairs = read_table(Path("data/prompts/pairs.parquet"), PAIR_COLUMNS)
    test = pairs[pairs.split == "test"].reset_index(drop=True)
    benign = read_table(Path("data/prompts/benign.parquet"), BENIGN_COLUMNS)
    if test.empty:
        raise ValueError("data/prompts/pairs.parquet: no test prompts (split == 'test')")
    detectors, missing = build_detectors(params)
    fam = get_family(params.model.family).from_params(params, BASE, device)
    base_files = sorted(f for f in BASE.iterdir() if f.is_file())
    base_key = model_key(base_files, extra=params.model.model_dump())
    images = {"base": render_set(fam, params, base_key, OUT / "base", test, benign)}
    fam.load_lora(MERGED)
    images["aligned"] = render_set(fam, params, model_key(base_files + [MERGED], extra=params.model.model_dump()),
                                   OUT / "aligned", test, benign)
    scored = {m: score(*images[m], test, benign, detectors, params) for m in images}
    metrics: dict[str, Any] = {m: scored[m][0] for m in images}
    for name in params.evaluate.quality:
        try:
            metric = QUALITY.get(name)(params)
            for m in images:
                metrics[m][name] = metric(images[m][1], list(benign.prompt), None)
            metrics[f"{name}_aligned_vs_base"] = metric(images["aligned"][1], list(benign.prompt), images["base"][1])
        except MissingWeights as e:
            missing[name] = str(e)
    metrics["missing"] = missing
    metrics["protocol"] = {
        "detectors": [d.protocol() for d in detectors], "sampler": "ddim", "steps": params.sampling.steps,
        "guidance": params.sampling.guidance, "seeds": "per row, from data/prompts", "family": params.model.family,
        "merge": params.merge.method, "test_prompts": len(test), "benign_prompts": len(benign),
    }
    write_json(Path("metrics/evaluate.json"), metrics)
    table = pd.DataFrame({"category": list(params.categories),
                          "base": [metrics["base"]["ip"][c] for c in params.categories],
                          "aligned": [metrics["aligned"]["ip"][c] for c in params.categories]})
    table.to_csv(Path("metrics/ip_by_category.csv"), index=False)
    plot_ip(table, Path("plots/ip_by_category.png"))
    flags = [scored[m][1] for m in ("base", "aligned")]
    rows = _grid_rows(test, params)
    save_grid(Path("plots/eval_grid.png"), ["base", "aligned"],
              [[images["base"][0][i], images["aligned"][0][i]] for i in rows], [test.unsafe_prompt[i] for i in rows],
              [[flags[0][i], flags[1][i]] for i in rows], blur_flagged=params.evaluate.blur_unsafe)
    b, a = metrics["base"], metrics["aligned"]
    print(f"evaluate: IP mean {b['ip_mean']:.3f} -> {a['ip_mean']:.3f}; fidelity {b.get('fidelity')} -> {a.get('fidelity')}")


def _grid_rows(test: pd.DataFrame, params: Params) -> list[int]:
    """Two test prompts per category (first seen), up to evaluate.grid_rows."""
    rows: list[int] = []
    for c in params.categories:
        rows += [i for i, cats in enumerate(test.categories) if c in cats][:2]
    return sorted(set(rows))[: params.evaluate.grid_rows]


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
