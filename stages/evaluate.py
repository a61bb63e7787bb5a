"""Stage `evaluate`: the base and the aligned model on the unsafe test prompts and the benign prompts.

    python -m stages.evaluate   # -> metrics/evaluate.json, metrics/ip_by_category.csv, plots/*.png, data/eval/
    accelerate launch --num_processes 2 -m stages.evaluate   # the same: each process renders every 2nd batch of
                                                             # every image set, scores all of them; one writes

dvc.yaml runs it through ``runtime.launcher`` (default ``python``; docs/scaling.md).

The aligned model is the base model as the method named by `method` attaches it (``models/aligned/``). Scoring:
``safealign.evaluation.scoring`` (IP per category, fidelity, twin rate); distribution quality from the
quality-metric registry. A detector or metric whose weights are missing is reported as missing with the
reason, never as a number. The protocol goes into the metrics.
"""
from __future__ import annotations

import sys
from typing import Any

import pandas as pd

from safealign.core.cli import run
from safealign.core.errors import MissingWeights
from safealign.core.hashing import files_key
from safealign.core.io import read_table, write_json
from safealign.core.params import load_params
from safealign.core.paths import ALIGNED, BASE, BENIGN, EVAL, METRICS, PAIRS, PLOTS, base_files
from safealign.core.runtime import process_shard, setup_runtime
from safealign.evaluation import QUALITY
from safealign.evaluation.grids import save_grid
from safealign.evaluation.plots import plot_ip
from safealign.evaluation.scoring import build_detectors, grid_rows, render_set, score
from safealign.evaluation.sets import load_sets, score_sets
from safealign.families import get_family
from safealign.methods import METHODS
from safealign.prompts.schema import BENIGN_COLUMNS, PAIR_COLUMNS
from safealign.psa.evaluate import user_metrics
from safealign.sc_dpo import COST
from safealign.sc_dpo.costmodel import mean_costs


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    pairs = read_table(PAIRS, PAIR_COLUMNS)
    test = pairs[pairs.split == "test"].reset_index(drop=True)
    benign = read_table(BENIGN, BENIGN_COLUMNS)
    if test.empty:
        raise ValueError(f"{PAIRS}: no test prompts (split == 'test')")
    detectors, missing = build_detectors(params)
    fam = get_family(params.model.family).from_params(params, BASE, device)
    extra = params.model.model_dump()
    images = {"base": render_set(fam, params.sampling, files_key(base_files(), extra=extra), EVAL / "base", test,
                                 benign)}
    sets, sets_missing = load_sets(params)  # evaluate.sets: OOD, attack and imported prompt sets
    set_scores = {"base": score_sets(fam, params, files_key(base_files(), extra=extra), "base", sets, detectors,
                                     EVAL / "sets")}
    method = METHODS.get(params.method)()
    identity = method.attach(fam, ALIGNED, params)
    view = method.renderer(fam) if hasattr(method, "renderer") else fam  # a method may render through a view (PSA)
    aligned_key = files_key(base_files() + identity, extra=extra)
    images["aligned"] = render_set(view, params.sampling, aligned_key, EVAL / "aligned", test, benign,
                                   combine=method.combine)
    set_scores["aligned"] = score_sets(view, params, aligned_key, "aligned", sets, detectors, EVAL / "sets",
                                       combine=method.combine)
    scored = {m: score(*images[m], test, benign, detectors, params.categories) for m in images}
    metrics: dict[str, Any] = {m: {**scored[m][0], "sets": set_scores[m]} for m in images}
    for name in params.evaluate.quality:
        try:
            metric = QUALITY.get(name)(params)
            for m in images:
                metrics[m][name] = metric(images[m][1], list(benign.prompt), None)
            metrics[f"{name}_aligned_vs_base"] = metric(images["aligned"][1], list(benign.prompt), images["base"][1])
        except MissingWeights as e:
            missing[name] = str(e)
    costs, why = mean_costs(params, COST, images, device)  # the SC-DPO cost model's view of every model
    for m in costs:
        metrics[m].update(costs[m])
    if why:
        missing["cost"] = why
    metrics["psa"] = user_metrics(params, fam, method, metrics, {m: images[m][0] for m in images}, test, aligned_key)
    rank, world, _ = process_shard(device)
    if rank > 0:  # launched as several processes (runtime.launcher): each rendered its share, one writes
        return
    metrics["missing"] = {**missing, **sets_missing}
    metrics["protocol"] = {
        "detectors": [d.protocol() for d in detectors], "sampler": "ddim", "steps": params.sampling.steps,
        "guidance": params.sampling.guidance, "seeds": "per row, from data/prompts", "family": params.model.family,
        "method": params.method,
        "merge": params.merge.method, "test_prompts": len(test), "benign_prompts": len(benign),
        "sets": {n: len(t) for n, t in sets.items()},
    }
    write_json(METRICS / "evaluate.json", metrics)
    table = pd.DataFrame({"category": list(params.categories),
                          "base": [metrics["base"]["ip"][c] for c in params.categories],
                          "aligned": [metrics["aligned"]["ip"][c] for c in params.categories]})
    table.to_csv(METRICS / "ip_by_category.csv", index=False)
    plot_ip(table, PLOTS / "ip_by_category.png")
    flags = [scored[m][1] for m in ("base", "aligned")]
    rows = grid_rows(test, params.categories, params.evaluate.grid_rows)
    save_grid(PLOTS / "eval_grid.png", ["base", "aligned"],
              [[images["base"][0][i], images["aligned"][0][i]] for i in rows], [test.unsafe_prompt[i] for i in rows],
              [[flags[0][i], flags[1][i]] for i in rows], blur_flagged=params.evaluate.blur_unsafe)
    b, a = metrics["base"], metrics["aligned"]
    print(f"evaluate: IP mean {b['ip_mean']:.3f} -> {a['ip_mean']:.3f}; fidelity {b.get('fidelity')} -> {a.get('fidelity')}; "
          f"{world} process(es)")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
