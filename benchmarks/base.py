"""Benchmark of the `base` stage: pretraining wall time and the accuracies reached, ours (v-prediction) side
by side with a baseline (the same model and steps with epsilon prediction), in one run.

    python benchmarks/base.py                 # the steps in params.yaml (several minutes per model)
    python benchmarks/base.py --steps 200     # quicker, lower accuracies

Last stdout line: one JSON object {"ours": {...}, "baseline": {...}} with wall_s and accuracies per model.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safealign.core.params import load_params
from safealign.core.runtime import setup_runtime
from safealign.families.toy import ToyFamily
from safealign.toyworld.pretrain import base_metrics, pretrain
from safealign.toyworld.settings import toy_settings


def run(params, prediction_type: str, steps: int, device: str) -> dict:
    toy, b = toy_settings(params), params.base
    m = toy.model
    fam = ToyFamily.build(image_size=toy.image_size, patch=m.patch, widths=m.widths, attention=m.attention,
                          text_dim=m.text_dim, layers_per_block=m.layers_per_block, seed=params.seed, device=device,
                          prediction_type=prediction_type)
    t0 = time.perf_counter()
    pretrain(fam, steps=steps, batch_size=b.batch_size, lr=b.lr, pool_size=b.pool_size,
             caption_dropout=b.caption_dropout, seed=params.seed, progress=False)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        metrics = base_metrics(fam, params, Path(tmp))
    return {"prediction": prediction_type, "steps": steps, "wall_s": round(wall, 1), "accuracy": metrics["accuracy"],
            "min_concept_rate": min(metrics["concept_rate"].values()),
            "max_false_positive_rate": max(metrics["false_positive_rate"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=0, help="pretraining steps (0: base.steps from params)")
    args = ap.parse_args()
    params = load_params(args.params)
    device = setup_runtime(params)
    steps = args.steps or params.base.steps
    rows = {"ours": run(params, "v_prediction", steps, device), "baseline": run(params, "epsilon", steps, device)}
    print(f"{'':10}{'pred':>14}{'steps':>7}{'wall s':>8}" + "".join(f"{a:>12}" for a in rows["ours"]["accuracy"])
          + f"{'concept min':>13}{'FP max':>8}")
    for name, r in rows.items():
        print(f"{name:10}{r['prediction']:>14}{r['steps']:>7}{r['wall_s']:>8}"
              + "".join(f"{v:>12.3f}" for v in r["accuracy"].values())
              + f"{r['min_concept_rate']:>13.3f}{r['max_false_positive_rate']:>8.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
