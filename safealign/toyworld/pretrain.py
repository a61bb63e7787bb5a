"""Pretraining of the toy family on freshly drawn toy images, and its base metrics.

``pretrain`` trains the UNet and the text encoder together (deterministic for a seed on the CPU); ``base_metrics``
measures attribute accuracy on held-back combinations, each category's concept rate and false-positive rate,
and writes a sample grid (flagged images blurred unless ``evaluate.blur_unsafe`` is off).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from safealign.core.runtime import poll_threads
from safealign.toyworld import world as tw
from safealign.toyworld.detect import detect_batch


def draw_pool(n: int, image_size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n random captions (all templates, no held-back combination) and their drawn images, deterministic."""
    rng = np.random.default_rng(seed)
    scenes: list[tw.Scene] = []
    while len(scenes) < n:
        scene = tw.random_scene(rng)
        if not tw.is_held_back(scene):  # held-back combinations are kept for the base metrics
            scenes.append(scene)
    images = tw.draw_batch(scenes, image_size, rng)
    return [s.caption() for s in scenes], images


def pretrain(fam: Any, steps: int, batch_size: int, lr: float, pool_size: int, caption_dropout: float,
             seed: int, log_every: int = 100, progress: bool = True,
             pool: tuple[list[str], np.ndarray] | None = None) -> list[dict[str, float]]:
    """Train the UNet and the text encoder together with the v-prediction MSE on drawn images.

    Deterministic for a given seed on the CPU (one generator drives captions, dropout, timesteps and noise).
    ``pool`` (captions, images in [0, 1]) replaces the drawn pool (tests use a smaller world). Returns the loss log.
    """
    captions, images = pool if pool is not None else draw_pool(pool_size, fam.image_size, seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) in [0, 1]
    gen = torch.Generator().manual_seed(seed)
    params = list(fam.unet.parameters()) + list(fam.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    fam.unet.train()
    fam.text_encoder.train()
    fam.text_encoder.requires_grad_(True)
    log: list[dict[str, float]] = []
    running = 0.0
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for step in bar:
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        idx = torch.randint(0, len(captions), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = fam.encode_images(x_all[idx])
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, fam.num_train_timesteps, (batch_size,), generator=gen).to(fam.device)
        pred = fam.predict(fam.add_noise(x0, noise, t), t, fam.encode_prompts(prompts))
        loss = torch.nn.functional.mse_loss(pred, fam.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": running / log_every})
            bar.set_postfix(loss=f"{running / log_every:.4f}")
            running = 0.0
    fam.eval()
    return log



# ---------------------------------------------------------------------------------------------- base metrics
def held_back_scenes(n: int, rng: np.random.Generator, **fixed: str) -> list[tw.Scene]:
    """n scenes (template 0: every attribute named) from the combinations pretraining never saw."""
    out: list[tw.Scene] = []
    while len(out) < n:
        scene = tw.random_scene(rng, template=0, **fixed)
        if tw.is_held_back(scene):
            out.append(scene)
    return out


def base_metrics(fam: Any, params: Any, plots: Path) -> dict[str, Any]:
    """Attribute accuracy on held-back captions; per category the concept rate (prompts with its concept where
    its detector fires) and the false-positive rate (prompts without it where it fires anyway); a sample grid."""
    from safealign.evaluation.grids import save_grid
    from safealign.evaluation.metrics import attribute_accuracy, rate
    from safealign.toyworld.settings import toy_settings

    concepts = toy_settings(params).concepts
    rng = np.random.default_rng(params.seed + 7)
    n = params.base.eval_prompts
    per_cat = max(1, n // len(params.categories))
    general = held_back_scenes(n, rng)
    concept_sets = {c: held_back_scenes(per_cat, rng, **{concepts[c].attribute: concepts[c].unsafe})
                    for c in params.categories}
    scenes = general + [s for v in concept_sets.values() for s in v]
    s = params.sampling
    images = fam.render([x.caption() for x in scenes], list(range(len(scenes))), s.steps, s.guidance, s.batch_size,
                        progress=True)
    detected = detect_batch(images)
    det_general, det_concept = detected[:n], detected[n:]
    acc = attribute_accuracy(det_general, [x.attributes() for x in general])
    concept_rate, false_positive = {}, {}
    for k, c in enumerate(params.categories):
        concept = concepts[c]
        shown = det_concept[k * per_cat:(k + 1) * per_cat]
        concept_rate[c] = rate(np.array([d[concept.attribute] == concept.unsafe for d in shown]))
        without = [d for d, x in zip(det_general, general) if getattr(x, concept.attribute) != concept.unsafe]
        false_positive[c] = rate(np.array([d[concept.attribute] == concept.unsafe for d in without]))
    shown = min(n, 24)
    unsafe = {(k.attribute, k.unsafe) for k in concepts.values()}
    flags = [[any((a, v) in unsafe for a, v in det_general[i].items())] for i in range(shown)]
    save_grid(plots / "base_samples.png", ["sample"], [[images[i]] for i in range(shown)],
              [x.caption() for x in general[:shown]], flags, blur_flagged=params.evaluate.blur_unsafe)
    return {"accuracy": acc, "concept_rate": concept_rate, "false_positive_rate": false_positive,
            "eval_prompts": len(scenes), "protocol": {"steps": s.steps, "guidance": s.guidance, "sampler": "ddim"}}
