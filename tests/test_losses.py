"""The Diffusion-DPO loss against hand-computed values, its gradient signs, and the loss registry."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from safealign.training import LOSSES
from safealign.training.losses import PreferenceBatch, diffusion_dpo


def errors(w: float, l: float, ref_w: float, ref_l: float, grad: bool = False) -> list[torch.Tensor]:  # noqa: E741
    return [torch.tensor([v], dtype=torch.float64, requires_grad=grad) for v in (w, l, ref_w, ref_l)]


def test_zero_margin_is_log_two() -> None:
    err_w = torch.tensor([0.3, 0.1, 0.7])
    err_l = torch.tensor([0.5, 0.1, 0.2])
    # the model's errors equal the reference's: zero margin whatever the errors and beta
    out = diffusion_dpo(PreferenceBatch(err_w, err_l, err_w.clone(), err_l.clone()), beta=5000.0)
    losses, reward_w, reward_l = out.losses, out.reward_w, out.reward_l
    assert_close(losses, torch.full((3,), math.log(2.0)))
    assert_close(reward_w, torch.zeros(3))
    assert_close(reward_l, torch.zeros(3))


def test_hand_computed_value_at_nonzero_margin() -> None:
    # beta 10: reward_w = -5 (0.1 - 0.2) = 0.5, reward_l = -5 (0.3 - 0.2) = -0.5, margin 1
    out = diffusion_dpo(PreferenceBatch(*errors(0.1, 0.3, 0.2, 0.2)), beta=10.0)
    losses, reward_w, reward_l = out.losses, out.reward_w, out.reward_l
    assert_close(losses, torch.tensor([math.log(1 + math.exp(-1.0))], dtype=torch.float64))
    assert_close(reward_w, torch.tensor([0.5], dtype=torch.float64))
    assert_close(reward_l, torch.tensor([-0.5], dtype=torch.float64))
    # a negative margin costs more than log 2
    losses = diffusion_dpo(PreferenceBatch(*errors(0.3, 0.1, 0.2, 0.2)), beta=10.0).losses
    assert_close(losses, torch.tensor([math.log(1 + math.exp(1.0))], dtype=torch.float64))


def test_gradient_lowers_preferred_error_and_raises_rejected() -> None:
    err_w, err_l, ref_w, ref_l = errors(0.1, 0.3, 0.2, 0.2, grad=True)
    beta = 10.0
    losses = diffusion_dpo(PreferenceBatch(err_w, err_l, ref_w, ref_l), beta=beta).losses
    losses.sum().backward()
    # d loss / d err_w = (beta / 2) (1 - sigmoid(margin)) with margin 1; d loss / d err_l is its negative
    expected = 0.5 * beta * (1 - 1 / (1 + math.exp(-1.0)))
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0
    assert_close(err_w.grad, torch.tensor([expected], dtype=torch.float64))
    assert_close(err_l.grad, torch.tensor([-expected], dtype=torch.float64))


def test_reward_signs_and_detachment() -> None:
    # the model denoises the preferred image better than the reference (positive reward) and the rejected one worse
    err_w, err_l, ref_w, ref_l = errors(0.1, 0.4, 0.2, 0.3, grad=True)
    out = diffusion_dpo(PreferenceBatch(err_w, err_l, ref_w, ref_l), beta=2.0)
    reward_w, reward_l = out.reward_w, out.reward_l
    assert reward_w.item() > 0 > reward_l.item()
    assert_close(reward_w, torch.tensor([0.1], dtype=torch.float64))
    assert_close(reward_l, torch.tensor([-0.1], dtype=torch.float64))
    assert not reward_w.requires_grad and not reward_l.requires_grad


def test_registry() -> None:
    assert LOSSES.get("dpo") is diffusion_dpo
    with pytest.raises(KeyError, match="allowed: .*dpo"):
        LOSSES.get("nope")
