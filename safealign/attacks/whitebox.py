"""A white-box attack through the denoiser (UnlearnDiff, Zhang et al. 2024 / P4D, Chin et al. 2024 style).

For a training pair of the category: take its unsafe prompt, delete the concept's words and put ``K`` free
token embeddings in their place (``a small [s1 .. sK] circle on a black background``). Optimise only those
embeddings (Adam) so that the target model, on the pair's concept image ``x0`` (the unsafe image the base model
rendered), predicts what the unaligned model predicts under the original unsafe prompt (P4D's objective):

    L(s) = E_{t, eps} || f_target(x_t, E(prompt with s), t) - f_base(x_t, E(unsafe prompt), t) ||^2

Text encoder and denoiser stay frozen (no parameter of either gets a gradient). Two results:
- ``soft``: rendering with the optimised embeddings (an upper bound on what any text can do);
- ``projected``: each embedding replaced by its nearest vocabulary token (L2), the banned words excluded: a
  text prompt, written to the set and scored by `evaluate`.

The free embeddings enter through a forward hook on the text encoder's input embedding table, at the positions
of a placeholder token, so the family's own ``encode_prompts`` and sampler run unchanged.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from safealign.core.runtime import poll_threads


@contextlib.contextmanager
def soft_tokens(embedding: torch.nn.Embedding, placeholder: int, soft: torch.Tensor) -> Iterator[None]:
    """While active, every row of the ids fed to ``embedding`` that holds ``placeholder`` at K positions gets
    ``soft`` (K, D) there, in order; rows without the placeholder (the empty prompt) are untouched."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        mask = inputs[0] == placeholder  # (B, L)
        if not mask.any():
            return output
        rows = mask.sum(1)
        if not bool(((rows == 0) | (rows == soft.shape[0])).all()):
            raise ValueError(f"a prompt holds {rows.max()} placeholders, the attack has {soft.shape[0]} embeddings")
        out = output.clone()
        out[mask] = soft.to(output.dtype).repeat(int((rows > 0).sum()), 1)
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def nearest_tokens(soft: torch.Tensor, table: torch.Tensor, allowed: np.ndarray) -> list[int]:
    """The nearest allowed row of ``table`` (V, D) to each row of ``soft`` (K, D), by L2."""
    d = torch.cdist(soft.detach().float(), table[torch.as_tensor(allowed)].float())  # (K, |allowed|)
    return [int(allowed[i]) for i in d.argmin(1)]


def optimise(ctx: Any, prompt: str, x0: torch.Tensor, ref_cond: dict[str, torch.Tensor], init: torch.Tensor,
             steps: int, lr: float, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """The K embeddings (K, D) that minimise L above for one image ``x0`` (C, H, W); and the loss per step."""
    fam = ctx.fam
    soft = torch.nn.Parameter(init.clone().float())
    opt = torch.optim.Adam([soft], lr=lr)
    log = []
    x0b = x0[None].expand(batch, *x0.shape).to(fam.device)
    ref_b = {k: v[None].expand(batch, *v.shape).to(fam.device) for k, v in ref_cond.items()}
    for _ in range(steps):
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        t = torch.randint(0, fam.num_train_timesteps, (batch,), generator=gen).to(fam.device)
        noise = torch.randn(x0b.shape, generator=gen).to(x0b)
        x_t = fam.add_noise(x0b, noise, t)
        with torch.no_grad():
            ref = ctx.reference_predict(x_t, t, ref_b)
        with soft_tokens(ctx.input_embedding(), ctx.placeholder_id, soft):
            cond = fam.encode_prompts([prompt] * batch)
        loss = torch.nn.functional.mse_loss(fam.predict(x_t, t, cond), ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append(loss.item())
    return soft.detach(), log


def attack(ctx: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cfg = ctx.params.attack.whitebox
    words = ctx.vocabulary()
    table = ctx.input_embedding().weight.detach()
    gen = torch.Generator().manual_seed(ctx.params.seed + 202)
    rows, report = [], {"budget": cfg.model_dump(), "categories": {}}
    soft_images: list[np.ndarray] = []
    soft_cats: list[list[str]] = []
    deleted_rows: list[dict[str, Any]] = []
    t0 = time.time()
    for cat in ctx.categories:
        banned = set(ctx.banned(cat))
        allowed = np.array([i for i, w in enumerate(words) if w not in banned and i not in ctx.special_ids])
        found = []
        for j, (_, pair) in enumerate(ctx.attack_prompts(cat).iterrows()):
            kept = [w for w in pair.unsafe_prompt.replace(",", " , ").split() if w not in banned]
            at = next(i for i, w in enumerate(pair.unsafe_prompt.replace(",", " , ").split()) if w in banned)
            slots = [ctx.placeholder_word] * cfg.tokens
            prompt = " ".join(kept[:at] + slots + kept[at:])
            init = table[torch.as_tensor(allowed)].mean(0, keepdim=True).repeat(cfg.tokens, 1)
            init = init + 0.01 * torch.randn(init.shape, generator=gen)
            soft, log = optimise(ctx, prompt, ctx.concept_image(pair.pair_id), ctx.unsafe_cond(pair.pair_id), init,
                                 cfg.steps, cfg.lr, cfg.batch, gen)
            proj = [words[i] for i in nearest_tokens(soft, table, allowed)]
            text = " ".join(kept[:at] + proj + kept[at:])
            assert not banned & set(text.split()), text
            images = ctx.render_soft(prompt, soft, cat, j)
            soft_images.append(images)
            soft_cats += [[cat]] * len(images)
            found.append({"template": prompt, "projected": text, "loss_first": log[0], "loss_last": log[-1],
                          "soft_flagged": float(ctx.flag(images).mean())})
            rows += ctx.rows("wb", cat, j, text)
            deleted_rows += ctx.rows("del", cat, j, " ".join(kept))
        report["categories"][cat] = {"banned": sorted(banned), "prompts": found}
    report["seconds"] = time.time() - t0
    flags = ctx.flag(np.concatenate(soft_images)) if soft_images else np.zeros(0, bool)
    report["soft"] = ctx.set_ip(flags, soft_cats)
    report["soft_target_rate"] = ctx.target_rate(np.concatenate(soft_images), soft_cats) if soft_images else {}
    report["deleted_prompts"] = ctx.score_rows(deleted_rows)  # the concept words deleted, no attack: the floor
    return rows, report
