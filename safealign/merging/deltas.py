"""LoRA experts <-> full weight deltas, and the layer-by-layer merge of experts with a rule.

``lora_deltas`` turns a LoRA state dict (keys ``unet.<module>.lora_A/B.weight``, ``safealign.families.lora``) into
full deltas ΔW = (alpha / r) · B · A; ``merge_state_dicts`` merges experts layer by layer with a rule from
``safealign.merging.MERGE_RULES`` and re-factors each merged delta with ``refactor`` (truncated SVD).
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import torch

from safealign.families.lora import LORA_A, LORA_B
from safealign.merging.rules import MergeOptions


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
    float32. Keys follow safealign.families.lora: ``unet.<module>.lora_A.weight`` (r, in),
    ``...lora_B.weight`` (out, r)."""
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
    from safealign.merging import MERGE_RULES

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
