"""Merge rules for LoRA experts, as pure functions (named in ``safealign.merging.MERGE_RULES``).

Domain: every rule merges FULL weight deltas of one layer, ΔW_i = (alpha / r) · B_i · A_i of shape (out, in), one
per expert (peft's ``*_svd`` style, not its merge of A and B separately); ``safealign.merging.deltas`` then
re-factors the merged delta to a rank-r LoRA by truncated SVD and reports the relative reconstruction error.

A rule is ``rule(deltas, *, options=MergeOptions(), stats=None) -> Tensor``:
- ``deltas``: a non-empty list of (out, in) tensors of one shape, one per expert;
- ``options``: whole-merge options (density, scale, seed) that rules not using them ignore;
- ``stats``: per-expert input statistics, each (in,) = mean |x_k| of the layer's input collected while that
  expert was attached (only ``co_merge`` reads them).
Rules only read their inputs and, for randomness, use a ``torch.Generator`` seeded from ``options.seed``.

Conventions (scale λ, density d): λ multiplies the merged delta of every rule but ``linear``.
- ``task_arithmetic``, ``ties`` and ``dare`` SUM the (sparsified) deltas and multiply by λ, as mergekit does with
  ``normalize: false``. TIES as published (and peft's ``disjoint_merge``) takes the MEAN of the agreeing entries
  instead; the sum is chosen here so that TIES at d = 1 with agreeing signs equals task arithmetic exactly and
  λ means the same thing in all three rules. With the mean, λ must grow with the number of experts.
- ``linear`` is the plain mean (no λ).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """Whole-merge options. ``density``: share of entries kept by ties/dare, in (0, 1]. ``scale``: λ of task
    arithmetic, ties, dare, max_abs and co_merge. ``seed``: seed of dare's drop mask. ``balance``: max_abs and
    co_merge divide each expert's activation by its mean over the layer before the per-element argmax (ours,
    not the paper's: an expert whose edit is small everywhere otherwise loses nearly every element)."""

    density: float = 0.5
    scale: float = 1.0
    seed: int = 0
    balance: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ValueError(f"MergeOptions.density must be in (0, 1], got {self.density}")
        if not math.isfinite(self.scale):
            raise ValueError(f"MergeOptions.scale must be finite, got {self.scale}")
        if not isinstance(self.seed, int):
            raise ValueError(f"MergeOptions.seed must be an int, got {self.seed!r}")
        if not isinstance(self.balance, bool):
            raise ValueError(f"MergeOptions.balance must be a bool, got {self.balance!r}")


DEFAULT_OPTIONS = MergeOptions()


class MergeRule(Protocol):
    def __call__(self, deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
                 stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor: ...


# ---------------------------------------------------------------------- primitives
def _stack(deltas: Sequence[torch.Tensor], rule: str) -> torch.Tensor:
    """Check the experts' deltas and stack them: n × (out, in) -> (n, out, in)."""
    if len(deltas) == 0:
        raise ValueError(f"{rule}: needs at least one delta")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.dim() != 2:
            raise ValueError(f"{rule}: delta {i} has shape {tuple(d.shape)}; each must be (out, in)")
        if d.shape != shape:
            raise ValueError(f"{rule}: delta {i} has shape {tuple(d.shape)}, delta 0 has {tuple(shape)}")
    stack = torch.stack(list(deltas))
    if not torch.isfinite(stack).all():
        raise ValueError(f"{rule}: deltas contain NaN or inf")
    return stack


def _scaled_sum(stack: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, out, in) -> scale · Σ_i stack[i], (out, in)."""
    return scale * stack.sum(dim=0)


def _winner_takes_all(stack: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Per element, the entry of the expert with the largest activation; ties go to the lowest expert index.

    stack, activation: (n, out, in) -> (out, in). The tie rule is written out (first maximum along dim 0), so it
    does not depend on how a backend's argmax breaks ties.
    """
    is_max = activation == activation.max(dim=0, keepdim=True).values  # (n, out, in)
    first_max = is_max & (is_max.cumsum(dim=0) == 1)
    return (stack * first_max).sum(dim=0)


def _balanced(activation: torch.Tensor) -> torch.Tensor:
    """Each expert's activation over its own mean on the layer: (n, out, in) -> (n, out, in).

    a_i / mean(a_i), so that every expert's activations average 1 and the argmax compares where each expert
    acts most *relative to itself*. An expert whose activation is zero everywhere stays zero (activations are
    non-negative, so a zero mean means all zeros: divided by 1; it wins nothing but ties). Scale-free:
    multiplying one expert's delta by c > 0 leaves the result's mask unchanged."""
    mean = activation.mean(dim=(1, 2), keepdim=True)
    return activation / torch.where(mean > 0, mean, torch.ones_like(mean))


def _activation(activation: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    return _balanced(activation) if options.balance else activation


# ---------------------------------------------------------------------- rules
def linear(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
           stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Linear average (model soup; Wortsman et al. 2022): mean_i Δ_i. n × (out, in) -> (out, in)."""
    return _stack(deltas, "linear").mean(dim=0)


def task_arithmetic(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
                    stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): λ · Σ_i Δ_i.

    n × (out, in) -> (out, in); λ = options.scale.
    """
    return _scaled_sum(_stack(deltas, "task_arithmetic"), options.scale)


def ties(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
         stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models"). n × (out, in) -> (out, in).

    1. trim: keep each Δ_i's top ``int(density · out · in)`` entries by magnitude (over the whole layer);
    2. elect: per element, the sign of the sum of the trimmed deltas (a zero sum elects +);
    3. disjoint merge: keep the entries agreeing with the elected sign and SUM them, times λ = options.scale.
    Convention: the paper and peft's ``disjoint_merge`` average the agreeing entries; we sum them (mergekit's
    ``normalize: false``), so that TIES at density 1 with agreeing signs equals ``task_arithmetic`` exactly.
    """
    # peft's primitives, imported here: importing the peft package costs seconds.
    from peft.utils.merge_utils import calculate_majority_sign_mask, magnitude_based_pruning

    stack = _stack(deltas, "ties")
    trimmed = torch.stack([magnitude_based_pruning(d, options.density) for d in stack])  # (n, out, in)
    agree = calculate_majority_sign_mask(trimmed, method="total")  # (n, out, in) bool; zeros never agree
    return _scaled_sum(trimmed * agree, options.scale)


def dare(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
         stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2023, "Language models are Super Mario"), followed by task arithmetic.

    n × (out, in) -> (out, in). Each entry of each Δ_i is kept with probability d = options.density (mask drawn
    from a ``torch.Generator`` seeded with options.seed, never the global RNG), survivors are rescaled by 1/d,
    and the result is λ · Σ_i (options.scale). Unbiased: E[result] = λ · Σ_i Δ_i. At d = 1 nothing is dropped.
    """
    stack = _stack(deltas, "dare")
    gen = torch.Generator(device=stack.device).manual_seed(options.seed)
    keep = torch.rand(stack.shape, generator=gen, device=stack.device) < options.density  # (n, out, in)
    return _scaled_sum(stack * keep / options.density, options.scale)


def max_abs(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
            stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Largest magnitude wins (a baseline; Co-Merge without input statistics).

    n × (out, in) -> (out, in): per element (o, k), Δ_i[o, k] of the expert i with the largest |Δ_i[o, k]|
    (over its mean |Δ_i| on the layer with ``options.balance``); ties go to the lowest expert index; times λ.
    """
    stack = _stack(deltas, "max_abs")
    return options.scale * _winner_takes_all(stack, _activation(stack.abs(), options))


def co_merge(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
             stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Co-Merge (SafetyDPO, Liu et al. 2025, arXiv 2412.10493), in our reading (METHOD.md, section 3).

    deltas: n × (out, in); stats: n × (in,), stats[i][k] = E|x_k| of the layer's input collected while expert i
    was attached. Activation a_i[o, k] = |Δ_i[o, k]| · stats[i][k]; mask M_i = (i == argmax_j a_j) per element,
    ties to the lowest expert index; merged = λ · Σ_i M_i ⊙ Δ_i, (out, in), λ = options.scale (1 = the rule as
    read; the argmax does not depend on λ, so λ < 1 is the same as merging experts trained to a smaller strength).
    Note: a statistic shared by all experts (e.g. collected on the base model) cancels in the argmax, and the
    rule gives ``max_abs`` (exactly so where that statistic is positive).
    ``options.balance`` (ours): a_i / mean_{o,k} a_i before the argmax (``_balanced``).
    """
    stack = _stack(deltas, "co_merge")
    if stats is None:
        raise ValueError("co_merge needs per-expert input statistics (stats), one (in,) tensor per expert")
    if len(stats) != stack.shape[0]:
        raise ValueError(f"co_merge: {len(stats)} stats for {stack.shape[0]} deltas")
    s = torch.stack([torch.as_tensor(x, dtype=stack.dtype, device=stack.device) for x in stats])  # (n, in)
    if s.shape != (stack.shape[0], stack.shape[2]):
        raise ValueError(f"co_merge: stats have shape {tuple(s.shape[1:])}; each must be (in,) = ({stack.shape[2]},)")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("co_merge: stats must be finite and non-negative (mean |x|)")
    return options.scale * _winner_takes_all(stack, _activation(stack.abs() * s[:, None, :], options))
