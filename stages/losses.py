"""Preference losses for diffusion models, as pure functions in a registry.

Each loss takes the per-pair denoising errors of the trained model and of the frozen reference
(shape (B,) each; ``_w`` = preferred, ``_l`` = rejected) and beta, and returns
``(losses, reward_w, reward_l)``, each of shape (B,). The implicit rewards are
``r = -(beta / 2) * (err_model - err_ref)``; the reward margin is ``r_w - r_l``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from stages.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def diffusion_dpo(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14), with the 0.5 factor of the reference code inside beta's term:

        inside = -(beta / 2) * [(err_w - err_l) - (ref_err_w - ref_err_l)],   loss = -log sigmoid(inside).

    At zero margin the loss is log 2; its gradient lowers err_w and raises err_l.
    """
    reward_w = -0.5 * beta * (err_w - ref_err_w)
    reward_l = -0.5 * beta * (err_l - ref_err_l)
    losses = -F.logsigmoid(reward_w - reward_l)
    return losses, reward_w.detach(), reward_l.detach()


LOSSES: Registry[LossFn] = Registry("loss")
LOSSES.add("dpo", diffusion_dpo)
