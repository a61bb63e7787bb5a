"""The ``sc_dpo`` method: LoRA trained with the SC-DPO loss on every category's pairs plus clean-prompt pairs.

``build`` (the `align` stage): the cost stage's model (``models/cost``) scores both images of every training pair
(render pairs and clean pairs, ``safealign.sc_dpo.clean``); ``sc_dpo.clean_share`` of the training set are clean
pairs; then ``safealign.training.loop.train_expert`` with the ``sc_dpo`` loss (``loss.py``, ``sc_dpo.cost_lambda``
and ``sc_dpo.gamma`` bound with ``functools.partial``). Every other training setting is ``train``'s, except
``sc_dpo.steps`` / ``anchor_weight`` / ``sft_weight`` where set. ``sc_dpo.mode``:

- ``single`` (the paper's setting): one LoRA on all categories, seeded as the `all` expert, so with
  cost_lambda = 0, gamma = 0 and clean_share = 0 it equals the All-single expert (``models/experts/all``);
- ``experts`` (a combination no paper reports): one SC-DPO expert per category (seeded as that category's
  expert, each with its own share of clean pairs), merged by ``merge.method`` with the merge stage's code
  (``safealign.merging.experts``); with lambda = gamma = clean_share = 0 it is the SafetyDPO pipeline.

Writes ``models/aligned/lora.safetensors`` (experts mode also ``experts/<category>.safetensors``), the training
logs ``train*.csv`` and ``method.json``; ``attach`` loads the LoRA.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch

from safealign.core.hashing import files_key, json_key
from safealign.core.ids import expert_seed
from safealign.core.io import atomic_path
from safealign.core.paths import BASE, CHECKPOINTS, RENDER, base_files
from safealign.families import get_family
from safealign.families.lora import save_lora
from safealign.sc_dpo import CLEAN, COST
from safealign.sc_dpo.clean import mix_rows, read_clean
from safealign.sc_dpo.costmodel import HEAD, load_cost_model, read_render_pairs
from safealign.sc_dpo.loss import sc_dpo_loss
from safealign.training.data import ROW_SOURCES, PairData, concat_pairs, load_pairs, pair_rows, read_cache
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


def scored_clean_pairs(model: Any) -> PairData | None:
    """The clean stage's pairs with both images' costs, or None if it wrote none."""
    import numpy as np

    from safealign.families.rendering import load_png

    manifest, data = read_clean()
    if data is None:
        return None
    img = lambda col: np.stack([load_png(CLEAN / p) for p in manifest[col]])
    cost_w = torch.from_numpy(model.costs(img("image_w"))).float()
    cost_l = torch.from_numpy(model.costs(img("image_l"))).float()
    return dataclasses.replace(data, cost_w=cost_w, cost_l=cost_l)


class ScDpo:
    name = "sc_dpo"
    combine = None  # a weight-space method: sampling is unchanged

    def build(self, params: Any, out: Path, device: str) -> dict[str, Any]:
        c, cfg, out = params.sc_dpo, training_config(params), Path(out)
        cached = read_cache()
        manifest, _ = cached
        model = load_cost_model(params, COST, device)
        pairs = read_render_pairs()
        cost_l_all = torch.from_numpy(model.costs(pairs.images_u)).float()  # the rejected (unsafe) side
        cost_w_all = torch.from_numpy(model.costs(pairs.images_s)).float()  # the preferred (safe) side
        clean = scored_clean_pairs(model) if c.clean_share > 0 else None
        files = [RENDER / "cache.safetensors", COST / HEAD] + base_files()
        if c.clean_share > 0:
            files.append(CLEAN / "cache.safetensors")
        loss_fn = functools.partial(sc_dpo_loss, lam=c.cost_lambda, gamma=c.gamma)
        categories = ["all"] if c.mode == "single" else list(params.categories)
        info: dict[str, Any] = {"method": self.name, "mode": c.mode, "cost_lambda": c.cost_lambda, "gamma": c.gamma,
                                "clean_share": c.clean_share, "steps": cfg.steps, "anchor_weight": cfg.anchor_weight,
                                "sft_weight": cfg.sft_weight, "pairs": 0, "pairs_by_expert": {}, "clean_pairs": {}}
        saved = []
        for cat in categories:
            rows = pair_rows(cat, params.categories, manifest)
            data = dataclasses.replace(load_pairs(cat, params.categories, cached), cost_w=cost_w_all[rows],
                                       cost_l=cost_l_all[rows])
            seed = expert_seed(params.seed, cat, params.categories)
            extra = mix_rows(len(data), 0 if clean is None else len(clean), c.clean_share, seed)
            if len(extra):
                data = concat_pairs(data, clean.select(torch.from_numpy(extra)))
            fam = get_family(params.model.family).from_params(params, BASE, device)
            key = json_key(cfg.model_dump(), c.model_dump(), self.name, cat, seed, files_key(files))
            terms = {t.rows_from: ROW_SOURCES[t.rows_from](cached) for t in active_terms(cfg) if t.rows_from}
            single = c.mode == "single"
            tag = self.name if single else f"{self.name}_{cat}"
            summary = train_expert(fam, data, cfg, seed, key, CHECKPOINTS / tag,
                                   out / ("train.csv" if single else f"train_{cat}.csv"), desc=tag, rows=terms,
                                   loss_fn=loss_fn)
            path = out / (LORA if single else f"experts/{cat}.safetensors")
            save_lora(path, fam.lora_state_dict(), cfg.rank, cfg.alpha, cfg.targets, category=cat,
                      pairs=str(len(data)), train=json.dumps(cfg.model_dump(), sort_keys=True),
                      sc_dpo=json.dumps(c.model_dump(), sort_keys=True))
            saved.append(path)
            info["pairs_by_expert"][cat], info["clean_pairs"][cat] = len(data) - len(extra), len(extra)
            info["pairs"] += len(data) - len(extra)
            info.update({f"last20_{k}" if single else f"last20_{k}_{cat}": v for k, v in summary.items()})
        if c.mode == "experts":
            from safealign.merging.experts import merge_experts, save_merged

            fam = get_family(params.model.family).from_params(params, BASE, device)
            merged = merge_experts(saved, categories, params, fam, cached)
            save_merged(out, merged, params, delta=False)
            info["merge"] = merged.summary(params.merge.method, params.merge.rank)
        info["train_cost_w_mean"], info["train_cost_l_mean"] = float(cost_w_all.mean()), float(cost_l_all.mean())
        with atomic_path(out / "method.json") as tmp:
            tmp.write_text(json.dumps(info, sort_keys=True) + "\n")
        return info

    def attach(self, fam: Any, folder: Path, params: Any) -> list[Path]:
        fam.load_lora(Path(folder) / LORA)
        return [Path(folder) / LORA]
