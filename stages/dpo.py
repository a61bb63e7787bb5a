"""One Diffusion-DPO step on a batch of preference pairs, for any model family.

The preferred and rejected images of a pair share one timestep and one noise draw, and go through the
denoiser in one batched forward pass; the reference is the same denoiser with its adapters disabled, under
no_grad (no second UNet in memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.family import Cond, Family, cond_cat
from stages.losses import LossFn


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    accuracy: float  # share of pairs with reward_w > reward_l (implicit accuracy)
    margin: float  # mean reward_w - reward_l
    err_w: float  # mean denoising error of the preferred images under the model
    err_l: float


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_step(fam: Family, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Cond, loss_fn: LossFn, beta: float,
             generator: torch.Generator) -> StepOutput:
    """x0_w, x0_l: (B, C, h, w) in model space; cond: the condition of each pair (B rows)."""
    b = x0_w.shape[0]
    t = torch.randint(0, fam.num_train_timesteps, (b,), generator=generator).to(fam.device)
    noise = torch.randn(x0_w.shape, generator=generator).to(x0_w)
    x0 = torch.cat([x0_w, x0_l])  # (2B, C, h, w): preferred first, then rejected
    noise2, t2, cond2 = torch.cat([noise, noise]), torch.cat([t, t]), cond_cat([cond, cond])
    x_t = fam.add_noise(x0, noise2, t2)
    target = fam.target(x0, noise2, t2)
    err_w, err_l = per_sample_error(fam.predict(x_t, t2, cond2), target).chunk(2)
    with torch.no_grad(), fam.adapters_disabled():
        ref_w, ref_l = per_sample_error(fam.predict(x_t, t2, cond2), target).chunk(2)
    losses, reward_w, reward_l = loss_fn(err_w, err_l, ref_w, ref_l, beta)
    return StepOutput(
        loss=losses.mean(),
        accuracy=(reward_w > reward_l).float().mean().item(),
        margin=(reward_w - reward_l).mean().item(),
        err_w=err_w.mean().item(),
        err_l=err_l.mean().item(),
    )
