"""Merge rules for LoRA experts, as pure functions in a registry, and the LoRA <-> full-delta plumbing around them.

Domain: every rule merges FULL weight deltas of one layer, ΔW_i = (alpha / r) · B_i · A_i of shape (out, in), one
per expert (peft's ``*_svd`` style, not its merge of A and B separately); ``merge_state_dicts`` then re-factors the
merged delta to a rank-r LoRA by truncated SVD and reports the relative reconstruction error.

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
import zlib
from collections.abc import Sequence
from typing import Protocol

import torch

from stages.registry import Registry

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # stages.family's key convention: unet.<module>.lora_A.weight


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """Whole-merge options. ``density``: share of entries kept by ties/dare, in (0, 1]. ``scale``: λ of task
    arithmetic, ties, dare, max_abs and co_merge. ``seed``: seed of dare's drop mask."""

    density: float = 0.5
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ValueError(f"MergeOptions.density must be in (0, 1], got {self.density}")
        if not math.isfinite(self.scale):
            raise ValueError(f"MergeOptions.scale must be finite, got {self.scale}")
        if not isinstance(self.seed, int):
            raise ValueError(f"MergeOptions.seed must be an int, got {self.seed!r}")


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
    # peft's primitives, imported here: importing the peft package costs seconds, and stages.config imports
    # this module to validate rule names.
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

    n × (out, in) -> (out, in): per element (o, k), Δ_i[o, k] of the expert i with the largest |Δ_i[o, k]|;
    ties go to the lowest expert index; times λ = options.scale.
    """
    stack = _stack(deltas, "max_abs")
    return options.scale * _winner_takes_all(stack, stack.abs())


def co_merge(deltas: Sequence[torch.Tensor], *, options: MergeOptions = DEFAULT_OPTIONS,
             stats: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Co-Merge (SafetyDPO, Liu et al. 2025, arXiv 2412.10493), in our reading (METHOD.md, section 3).

    deltas: n × (out, in); stats: n × (in,), stats[i][k] = E|x_k| of the layer's input collected while expert i
    was attached. Activation a_i[o, k] = |Δ_i[o, k]| · stats[i][k]; mask M_i = (i == argmax_j a_j) per element,
    ties to the lowest expert index; merged = λ · Σ_i M_i ⊙ Δ_i, (out, in), λ = options.scale (1 = the rule as
    read; the argmax does not depend on λ, so λ < 1 is the same as merging experts trained to a smaller strength).
    Note: a statistic shared by all experts (e.g. collected on the base model) cancels in the argmax, and the
    rule gives ``max_abs`` (exactly so where that statistic is positive).
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
    return options.scale * _winner_takes_all(stack, stack.abs() * s[:, None, :])


MERGE_RULES: Registry[MergeRule] = Registry("merge rule")
for _rule in (linear, task_arithmetic, ties, dare, max_abs, co_merge):
    MERGE_RULES.add(_rule.__name__, _rule)


# ---------------------------------------------------------------------- LoRA <-> full deltas
def _lora_factors(state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module key -> (A (r, in), B (out, r)) from a LoRA state dict, checking keys and shapes."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        suffix = next((s for s in (LORA_A, LORA_B) if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"LoRA key {key!r} ends in neither {LORA_A!r} nor {LORA_B!r}")
        modules.setdefault(key[: -len(suffix)], {})[suffix] = value
    factors = {}
    for module, pair in sorted(modules.items()):
        if len(pair) != 2:
            raise ValueError(f"LoRA module {module!r} lacks its {LORA_B if LORA_A in pair else LORA_A}")
        a, b = pair[LORA_A], pair[LORA_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"LoRA module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"are not (r, in) and (out, r) with rank r = {rank}")
        factors[module] = (a, b)
    return factors


def _delta(a: torch.Tensor, b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """(alpha / r) · B · A in float32: A (r, in), B (out, r) -> (out, in)."""
    return (alpha / rank) * (b.float() @ a.float())


def lora_deltas(state: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Full deltas from a LoRA state dict: module key (``unet.<module>``) -> ΔW = (alpha / r) · B · A, (out, in),
    float32. Keys follow stages.family: ``unet.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)."""
    return {m: _delta(a, b, alpha, rank) for m, (a, b) in _lora_factors(state, rank).items()}


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a full delta into LoRA factors with scale 1 (alpha = rank).

    delta (out, in) -> A (rank, in), B (out, rank), float32, with B · A the best rank-``rank`` approximation;
    the singular values are split evenly (B = U·√S, A = √S·Vᵀ). If rank > min(out, in), A and B are padded with
    zero rows / columns. Also returns the relative error ||delta - B·A||_F / ||delta||_F (0.0 for a zero delta).
    """
    if delta.dim() != 2:
        raise ValueError(f"refactor: delta has shape {tuple(delta.shape)}; it must be (out, in)")
    if rank < 1:
        raise ValueError(f"refactor: rank must be >= 1, got {rank}")
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)  # (out, m), (m,), (m, in); m = min(out, in)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = d.new_zeros(rank, d.shape[1])
    b = d.new_zeros(d.shape[0], rank)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    norm = torch.linalg.matrix_norm(d)
    error = 0.0 if norm == 0 else float(torch.linalg.matrix_norm(d - b @ a) / norm)
    return a, b, error


def _layer_seed(seed: int, module: str) -> int:
    """A seed per (merge seed, layer), so that layers of one shape do not share dare's drop mask."""
    return (seed * 2**32 + zlib.crc32(module.encode())) % 2**63


def merge_state_dicts(expert_states: Sequence[dict[str, torch.Tensor]], alpha: float, rank: int, method: str,
                      options: MergeOptions, stats: Sequence[dict[str, torch.Tensor]] | None,
                      out_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Merge LoRA experts (all of rank ``rank`` and scale alpha / rank) layer by layer with rule ``method``.

    stats: one dict per expert, module key -> (in,) mean |input| (needed by co_merge), or None.
    Each layer is merged with ``options`` but a seed derived from (options.seed, module key).
    Returns (merged LoRA state dict, keys ``unet.<module>.lora_A/B.weight``, rank ``out_rank`` and scale 1, so it
    is to be saved with alpha = out_rank; merged full deltas by module key; relative SVD error by module key).
    """
    rule = MERGE_RULES.get(method)
    if not expert_states:
        raise ValueError("merge_state_dicts: needs at least one expert")
    if stats is not None and len(stats) != len(expert_states):
        raise ValueError(f"merge_state_dicts: {len(stats)} stats dicts for {len(expert_states)} experts")
    experts = [_lora_factors(s, rank) for s in expert_states]
    for i, e in enumerate(experts[1:], start=1):
        if e.keys() != experts[0].keys():
            diff = sorted(e.keys() ^ experts[0].keys())
            raise ValueError(f"merge_state_dicts: expert {i} and expert 0 adapt different modules, e.g. {diff[0]!r}")
    state: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module in experts[0]:
        deltas = [_delta(*e[module], alpha, rank) for e in experts]  # built per layer: n full deltas at a time
        layer_stats = None
        if stats is not None:
            missing = [i for i, s in enumerate(stats) if module not in s]
            if missing:
                raise ValueError(f"merge_state_dicts: stats of expert {missing[0]} lack module {module!r}")
            layer_stats = [s[module] for s in stats]
        layer_options = dataclasses.replace(options, seed=_layer_seed(options.seed, module))
        merged[module] = rule(deltas, options=layer_options, stats=layer_stats)
        a, b, errors[module] = refactor(merged[module], out_rank)
        state[module + LORA_A], state[module + LORA_B] = a.contiguous(), b.contiguous()
    return state, merged, errors
