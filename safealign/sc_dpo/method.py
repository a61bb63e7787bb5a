"""The ``sc_dpo`` method: one LoRA trained on every category's pairs with the SC-DPO loss (the paper's setting).

``build`` (the `align` stage): costs of each training pair's images by the cost stage's model (``models/cost``),
then ``safealign.training.loop.train_expert`` with ``train.loss`` replaced by ``sc_dpo`` (``loss.py``) under the
settings of ``sc_dpo.cost_lambda`` and ``sc_dpo.gamma``; every other training setting is ``train``'s, except
``sc_dpo.steps`` / ``anchor_weight`` / ``sft_weight`` where set. The seed is the `all` expert's, so with
cost_lambda = 0 and gamma = 0 the LoRA equals the All-single expert (``models/experts/all.safetensors``).
Writes ``models/aligned/lora.safetensors`` (and its training log ``train.csv``); ``attach`` loads it.

Not done (issue 15): clean-prompt pairs; SC-DPO experts per category merged by Co-Merge.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch

from safealign.core.hashing import files_key, json_key
from safealign.core.io import atomic_path
from safealign.core.paths import BASE, CHECKPOINTS, RENDER, base_files
from safealign.families import get_family
from safealign.families.lora import save_lora
from safealign.sc_dpo import COST
from safealign.sc_dpo.costmodel import HEAD, load_cost_model, read_render_pairs
from safealign.sc_dpo.loss import sc_dpo_loss
from safealign.training.data import ROW_SOURCES, load_pairs, read_cache
from safealign.training.loop import train_expert
from safealign.training.terms import active_terms

LORA = "lora.safetensors"


def training_config(params: Any) -> Any:
    """``params.train`` with the loss set to ``sc_dpo`` and the ``sc_dpo`` section's overrides applied."""
    c, t = params.sc_dpo, params.train
    update: dict[str, Any] = {"loss": "sc_dpo"}
    for key in ("steps", "anchor_weight", "sft_weight"):
        if getattr(c, key) is not None:
            update[key] = getattr(c, key)
    return t.model_copy(update=update)


class ScDpo:
    name = "sc_dpo"
    combine = None  # a weight-space method: sampling is unchanged

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        c, cfg = params.sc_dpo, training_config(params)
        cached = read_cache()
        manifest, _ = cached
        data = load_pairs("all", params.categories, cached)
        rows = [i for i, cats in enumerate(manifest.categories) if set(params.categories) & set(cats)]
        model = load_cost_model(params, COST, device)
        pairs = read_render_pairs()
        cost_u = torch.from_numpy(model.costs(pairs.images_u[rows])).float()  # the rejected (unsafe) side
        cost_w = torch.from_numpy(model.costs(pairs.images_s[rows])).float()  # the preferred (safe) side
        fam = get_family(params.model.family).from_params(params, BASE, device)
        seed = params.seed * 1000  # the `all` expert's seed (stages/train.py expert_seed)
        files = [RENDER / "cache.safetensors", COST / HEAD] + base_files()
        key = json_key(cfg.model_dump(), c.model_dump(), self.name, seed, files_key(files))
        terms = {term.rows_from: ROW_SOURCES[term.rows_from](cached) for term in active_terms(cfg) if term.rows_from}
        loss_fn = functools.partial(sc_dpo_loss, lam=c.cost_lambda, gamma=c.gamma)
        summary = train_expert(fam, dataclasses.replace(data, cost_w=cost_w, cost_l=cost_u), cfg, seed, key,
                               CHECKPOINTS / self.name, Path(out) / "train.csv", desc=self.name, rows=terms,
                               loss_fn=loss_fn)
        save_lora(Path(out) / LORA, fam.lora_state_dict(), cfg.rank, cfg.alpha, cfg.targets, category="all",
                  pairs=str(len(data)), train=json.dumps(cfg.model_dump(), sort_keys=True),
                  sc_dpo=json.dumps(c.model_dump(), sort_keys=True))
        info = {"method": self.name, "pairs": len(data), "cost_lambda": c.cost_lambda, "gamma": c.gamma,
                "steps": cfg.steps, "anchor_weight": cfg.anchor_weight, "sft_weight": cfg.sft_weight,
                "train_cost_w_mean": float(cost_w.mean()), "train_cost_l_mean": float(cost_u.mean()),
                **{f"last20_{k}": v for k, v in summary.items()}}
        with atomic_path(Path(out) / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        fam.load_lora(Path(folder) / LORA)
        return [Path(folder) / LORA]
