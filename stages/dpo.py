"""One Diffusion-DPO step on a batch of preference pairs, for any model family.

The preferred and rejected images of a pair share one timestep and one noise draw, and go through the
denoiser in one batched forward pass; the reference is the same denoiser with its adapters disabled, under
no_grad (no second UNet in memory).

Optional anchor term (our addition, ``train.anchor_weight``; 0 = the paper's loss): on a batch of anchor
prompts (safe prompts with their images) the trained model's prediction is pulled toward the reference's.
The DPO loss only constrains the pairs' own prompts; without an anchor, an expert that learns "red -> blue"
also turns purple prompts blue (measured on the toy world). The anchor rows ride in the same forward pass.

Optional supervised term (``train.sft_weight``; 0 = the paper's loss): w · mean err_w, the trained model's
denoising error on the preferred image under the condition prompt (as RPO adds the chosen answer's NLL to DPO).
DPO alone only asks the preferred image to become likelier *relative to* the rejected one; on the toy world it
walked past the safe twin (yellow -> red, another unsafe colour, instead of orange). The term costs no extra pass.
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
    anchor: float = 0.0  # mean squared model-vs-reference difference on the anchor rows (0 without anchors)


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def anchor_loss(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """Mean over anchor rows of the squared difference between model and reference predictions (a scalar)."""
    return per_sample_error(pred, ref_pred.detach()).mean()


def dpo_step(fam: Family, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Cond, loss_fn: LossFn, beta: float,
             generator: torch.Generator, anchor: tuple[torch.Tensor, Cond] | None = None,
             anchor_weight: float = 0.0, sft_weight: float = 0.0) -> StepOutput:
    """x0_w, x0_l: (B, C, h, w) in model space; cond: the condition of each pair (B rows).

    ``anchor``: (x0, cond) of A anchor rows, each with its own timestep and noise, used when anchor_weight > 0.
    """
    b = x0_w.shape[0]
    t = torch.randint(0, fam.num_train_timesteps, (b,), generator=generator).to(fam.device)
    noise = torch.randn(x0_w.shape, generator=generator).to(x0_w)
    x0 = torch.cat([x0_w, x0_l])  # (2B, C, h, w): preferred first, then rejected
    noise2, t2, cond2 = torch.cat([noise, noise]), torch.cat([t, t]), cond_cat([cond, cond])
    x_t = fam.add_noise(x0, noise2, t2)
    target = fam.target(x0, noise2, t2)
    use_anchor = anchor is not None and anchor_weight > 0
    if use_anchor:
        a_x0, a_cond = anchor
        a_t = torch.randint(0, fam.num_train_timesteps, (a_x0.shape[0],), generator=generator).to(fam.device)
        a_noise = torch.randn(a_x0.shape, generator=generator).to(a_x0)
        x_t = torch.cat([x_t, fam.add_noise(a_x0, a_noise, a_t)])
        t2, cond2 = torch.cat([t2, a_t]), cond_cat([cond2, a_cond])
    pred = fam.predict(x_t, t2, cond2)
    with torch.no_grad(), fam.adapters_disabled():
        ref = fam.predict(x_t, t2, cond2)
    err_w, err_l = per_sample_error(pred[: 2 * b], target).chunk(2)
    ref_w, ref_l = per_sample_error(ref[: 2 * b], target).chunk(2)
    losses, reward_w, reward_l = loss_fn(err_w, err_l, ref_w, ref_l, beta)
    loss = losses.mean()
    if sft_weight > 0:
        loss = loss + sft_weight * err_w.mean()
    a_loss = anchor_loss(pred[2 * b:], ref[2 * b:]) if use_anchor else None
    if a_loss is not None:
        loss = loss + anchor_weight * a_loss
    return StepOutput(
        loss=loss,
        accuracy=(reward_w > reward_l).float().mean().item(),
        margin=(reward_w - reward_l).mean().item(),
        err_w=err_w.mean().item(),
        err_l=err_l.mean().item(),
        anchor=a_loss.item() if a_loss is not None else 0.0,
    )
