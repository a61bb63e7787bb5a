"""Ring-A-Bell (Tsai et al., ICLR 2024): a model-agnostic attack that needs only the text encoder.

1. Concept vector ``c = mean_i [E(p_i with the concept) - E(p_i without)]`` over prompt pairs that differ only
   in the concept (here: the category's training pairs, unsafe prompt minus its safe twin). ``E`` is the text
   encoder's output, the (L, D) states the denoiser cross-attends to.
2. Target ``E(p) + eta * c`` for a prompt ``p`` without the concept (a safe twin).
3. A genetic search over prompts of ``K`` free tokens from the vocabulary minus the banned words (the concept's
   own): fitness ``-||E(x) - target||^2`` (higher is better); each generation keeps its ``elite`` best
   unchanged (so the best fitness never worsens), fills the rest with children of tournament-chosen parents
   (one-point crossover with probability ``crossover``, then each token resampled with probability
   ``mutation``).

Paper budget: K 16 (also 38, 75), population 200, 3,000 generations, mutation 0.25, crossover 0.5, eta 3-5.5.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from safealign.core.runtime import poll_threads


def concept_vector(embed: Callable[[list[str]], torch.Tensor], with_concept: Sequence[str],
                   without: Sequence[str]) -> torch.Tensor:
    """Mean of E(with) - E(without) over the pairs; (L, D)."""
    if len(with_concept) != len(without) or not with_concept:
        raise ValueError("concept_vector needs as many prompts with the concept as without, at least one")
    return (embed(list(with_concept)) - embed(list(without))).mean(0)


def genetic_search(fitness: Callable[[np.ndarray], np.ndarray], allowed: np.ndarray, tokens: int, population: int,
                   generations: int, mutation: float, crossover: float, elite: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Maximise ``fitness`` (int (P, K) token ids -> float (P,)) over sequences of ``allowed`` ids.

    Returns the best sequence (K,) and the best fitness after each generation (non-decreasing: elitism)."""
    if not 1 <= elite < population:
        raise ValueError(f"elite must be in [1, population); got {elite} of {population}")
    pop = rng.choice(allowed, size=(population, tokens))
    fit = fitness(pop)
    history = [float(fit.max())]
    for _ in range(generations):
        poll_threads()  # runtime.threads: auto follows the load (safealign/core/runtime.py)
        order = np.argsort(-fit)
        keep = pop[order[:elite]]
        n = population - elite
        # tournament of 3 for each parent
        cand = rng.integers(0, population, size=(2, n, 3))
        parents = np.take_along_axis(cand, np.argmax(fit[cand], axis=-1)[..., None], axis=-1)[..., 0]  # (2, n)
        a, b = pop[parents[0]], pop[parents[1]]
        cut = rng.integers(1, max(2, tokens), size=n)
        cross = rng.random(n) < crossover
        cols = np.arange(tokens)[None]
        children = np.where(cross[:, None] & (cols >= cut[:, None]), b, a)
        mutate = rng.random(children.shape) < mutation
        children = np.where(mutate, rng.choice(allowed, size=children.shape), children)
        pop = np.concatenate([keep, children])
        fit = np.concatenate([fit[order[:elite]], fitness(children)])
        history.append(float(fit.max()))
    return pop[int(np.argmax(fit))], history


def attack(ctx: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per category: ``prompts_per_category`` searches (targets from the category's safe twins), each best prompt
    written ``seeds_per_prompt`` times (rows of the set). Returns (rows, report)."""
    cfg = ctx.params.attack.ring_a_bell
    words = ctx.vocabulary()
    rng = np.random.default_rng(ctx.params.seed + 101)
    rows, report = [], {"budget": cfg.model_dump(), "categories": {}}
    t0 = time.time()
    for cat in ctx.categories:
        pairs = ctx.pairs(cat)
        c = concept_vector(ctx.embed, list(pairs.unsafe_prompt), list(pairs.safe_prompt))
        banned = set(ctx.banned(cat))
        allowed = np.array([i for i, w in enumerate(words) if w not in banned and i not in ctx.special_ids])
        found = []
        for j, safe in enumerate(ctx.attack_prompts(cat)["safe_prompt"]):
            target = ctx.embed([safe])[0] + cfg.eta * c

            def fitness(ids: np.ndarray, target: torch.Tensor = target) -> np.ndarray:
                e = ctx.embed([" ".join(words[i] for i in row) for row in ids])
                return -((e - target) ** 2).flatten(1).sum(1).numpy()

            best, history = genetic_search(fitness, allowed, cfg.tokens, cfg.population, cfg.generations,
                                           cfg.mutation, cfg.crossover, cfg.elite, rng)
            prompt = " ".join(words[i] for i in best)
            assert not banned & set(prompt.split()), prompt
            found.append({"prompt": prompt, "from": safe, "fitness_first": history[0],
                          "fitness_best": history[-1]})
            rows += ctx.rows("rab", cat, j, prompt)
        report["categories"][cat] = {"banned": sorted(banned), "prompts": found,
                                     "concept_vector_norm": float(c.norm())}
    report["seconds"] = time.time() - t0
    return rows, report
