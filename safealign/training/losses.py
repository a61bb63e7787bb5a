"""Preference losses for diffusion models, as pure functions over a per-pair record.

A loss takes a ``PreferenceBatch`` (the per-pair denoising errors of the trained model and of the frozen
reference, shape (B,) each, ``_w`` = preferred, ``_l`` = rejected, plus optional per-pair costs) and beta, and
returns a ``LossOutput``: per-pair losses and implicit rewards, each (B,). The implicit rewards are
``r = -(beta / 2) * (err_model - err_ref)``; the reward margin is ``r_w - r_l``. Reduction over pairs (with the
record's optional per-pair ``weight``) is the caller's: ``reduce``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """What a preference loss sees of B pairs; every tensor is (B,).

    ``weight``: optional per-pair weights of the reduction (e.g. a mixing share); ``cost_w`` / ``cost_l``: optional
    per-pair safety costs of the preferred / rejected image (a cost model's output)."""

    err_w: torch.Tensor
    err_l: torch.Tensor
    ref_err_w: torch.Tensor
    ref_err_l: torch.Tensor
    weight: torch.Tensor | None = None
    cost_w: torch.Tensor | None = None
    cost_l: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,), differentiable
    reward_w: torch.Tensor  # (B,), detached
    reward_l: torch.Tensor  # (B,), detached


LossFn = Callable[[PreferenceBatch, float], LossOutput]


def implicit_rewards(batch: PreferenceBatch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l) = -(beta / 2) * (err - ref_err) for each side, (B,) each, differentiable."""
    return -0.5 * beta * (batch.err_w - batch.ref_err_w), -0.5 * beta * (batch.err_l - batch.ref_err_l)


def diffusion_dpo(batch: PreferenceBatch, beta: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14), with the 0.5 factor of the reference code inside beta's term:

        inside = -(beta / 2) * [(err_w - err_l) - (ref_err_w - ref_err_l)],   loss = -log sigmoid(inside).

    At zero margin the loss is log 2; its gradient lowers err_w and raises err_l. Ignores costs.
    """
    reward_w, reward_l = implicit_rewards(batch, beta)
    losses = -F.logsigmoid(reward_w - reward_l)
    return LossOutput(losses, reward_w.detach(), reward_l.detach())


def reduce(losses: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs: ``losses.mean()``, or ``(weight * losses).mean()`` with per-pair weights (B,)."""
    return losses.mean() if weight is None else (weight * losses).mean()
