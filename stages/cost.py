"""Stage `cost`: the SC-DPO safety cost model, a frozen image encoder plus a small trained head.

    python -m stages.cost    # -> models/cost/head.safetensors, metrics/cost.json

Trained on the render stage's pairs (the unsafe prompt's image costs more than its safe twin; labels from the
pairs, never from a detector), except a held-out share of them (``sc_dpo.holdout``) on which the cost is
measured against the detectors' labels (``evaluate.detectors``): AUROC and calibration error per category,
mean cost of harmful and harmless images. Library: ``safealign.sc_dpo`` (``cost``, ``costmodel``, ``encoders``).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from safealign.core.cli import run
from safealign.core.errors import MissingWeights, UserError
from safealign.core.io import write_json
from safealign.core.params import load_params
from safealign.core.paths import METRICS
from safealign.core.runtime import setup_runtime
from safealign.evaluation import DETECTORS
from safealign.sc_dpo import COST
from safealign.sc_dpo.cost import cost_metrics
from safealign.sc_dpo.costmodel import (
    CostModel,
    category_matrix,
    fit_head,
    holdout_mask,
    make_encoder,
    read_render_pairs,
    save_head,
)


def detector_labels(params, images: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """bool (N,): flagged by any configured detector, and the detectors' protocols; None if one is missing."""
    flags, protocols = np.zeros(len(images), bool), []
    for name in params.evaluate.detectors:
        try:
            det = DETECTORS.get(name)(params)
        except MissingWeights as e:
            print(f"cost: detector {name} missing ({e}); measuring against the pairs' labels only")
            return None, []
        flags |= det(images)
        protocols.append(det.protocol())
    return flags, protocols


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    device = setup_runtime(params)
    t0, c = time.time(), params.sc_dpo
    pairs = read_render_pairs()
    held = holdout_mask(pairs.pair_ids, c.holdout, params.seed)
    if held.all() or not held.any():
        raise UserError(f"sc_dpo.holdout={c.holdout}: leaves {int((~held).sum())} training and {int(held.sum())} "
                         "held-out pairs; both need at least one")
    train, test = pairs.take(~held), pairs.take(held)
    encoder = make_encoder(params, device)
    head = fit_head(encoder.features(train.images_u), encoder.features(train.images_s),
                    category_matrix(train.categories, params.categories), c, params.seed)
    model = CostModel(encoder, head)
    costs_u, costs_s = model.costs(test.images_u), model.costs(test.images_s)
    n = len(test.pair_ids)
    labels, protocols = detector_labels(params, np.concatenate([test.images_u, test.images_s]))
    source = "detectors"
    if labels is None:
        labels, source = np.concatenate([np.ones(n, bool), np.zeros(n, bool)]), "pairs"
    metrics = cost_metrics(costs_u, costs_s, labels[:n], labels[n:], test.categories, params.categories)
    metrics["protocol"] = {
        "held_out": f"{n} of {len(pairs.pair_ids)} render pairs (train split prompts, base model renders), chosen by a "
                    f"seeded hash of the pair id (sc_dpo.holdout={c.holdout}); the head never saw them",
        "labels": source, "detectors": protocols, "encoder": encoder.protocol(), "train_pairs": len(train.pair_ids),
        "objective": {"pair_bt": 1.0, "category_contrast": c.cost_contrast_weight, "anchoring": c.cost_anchor_weight,
                      "other_categories": c.cost_other_weight},
    }
    save_head(COST, head, encoder, params.categories, train_pairs=len(train.pair_ids))
    write_json(METRICS / "cost.json", metrics)
    print(f"cost: {len(train.pair_ids)} training pairs, {n} held out; AUROC {metrics['auroc']['overall']}, "
          f"cost safe {metrics['cost_safe_mean']}, unsafe {metrics['cost_unsafe_mean']} "
          f"in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(run(main, *sys.argv[1:]))
