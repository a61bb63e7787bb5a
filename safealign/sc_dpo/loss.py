"""The SC-DPO preference loss over the per-pair record (``safealign.training.losses.PreferenceBatch``).

With ``z = r_w - r_l`` the Diffusion-DPO margin (implicit rewards ``r = -(beta / 2) * (err - ref_err)``) and
``C`` the safety cost of an image (a cost model's output, in [0, 1]; no gradient flows into it):

    m   = z - lam * (C(x_l) - C(x_w))              # the cost-calibrated margin
    w   = stop_grad((1 - sigmoid(z)) ** gamma)      # DFM: Dynamic Focusing, a focal weight on hard pairs
    L   = -w * log sigmoid(m)

Reading of the issue and ../shared/METHOD.md, not a published formula. The cost gap enters as an *offset*: a
pair whose rejected image costs more than its preferred one must be won by a margin of at least
``lam * (C_l - C_w)`` before its loss fades, so the gradient towards the lower-cost image is larger the more
harmful the rejected image is (``dL/dz = -sigmoid(-m)`` grows as ``m`` falls). When the preferred image is the
costlier one (a clean-prompt pair ranked by quality), the offset is negative and the pair pushes less. The sign
is the point: ``z + lam * (C_l - C_w)`` (the cost "explaining away" the preference) would *shrink* the push on
exactly the pairs whose rejected image is harmful.

``gamma`` = 0 gives w = 1 and ``lam`` = 0 gives m = z: Diffusion-DPO exactly (``tests/test_sc_dpo.py``).
Registered as ``train.loss: sc_dpo`` with lam = gamma = 0; the ``sc_dpo`` method binds ``sc_dpo.cost_lambda`` and
``sc_dpo.gamma`` with ``functools.partial`` and puts each pair's costs into its ``PairData``, which the training
step forwards into the record.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safealign.training.losses import LossOutput, PreferenceBatch, implicit_rewards


def focal_weight(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """DFM weight ``(1 - sigmoid(z)) ** gamma``, (B,) -> (B,), detached: in (0, 1), larger for harder pairs
    (smaller margin z); exactly 1 at gamma = 0."""
    if gamma == 0:
        return torch.ones_like(z).detach()
    return (1 - torch.sigmoid(z.detach())).pow(gamma)


def cost_margin(batch: PreferenceBatch, lam: float) -> torch.Tensor | None:
    """``lam * (C_l - C_w)`` (B,), detached; None when lam is 0. Needs the record's costs when lam > 0."""
    if lam == 0:
        return None
    if batch.cost_w is None or batch.cost_l is None:
        raise ValueError("the sc_dpo loss with sc_dpo.cost_lambda > 0 needs per-pair costs (cost_w, cost_l)")
    return lam * (batch.cost_l - batch.cost_w).detach()


def sc_dpo_loss(batch: PreferenceBatch, beta: float, lam: float = 0.0, gamma: float = 0.0) -> LossOutput:
    """Per-pair SC-DPO losses (B,) and implicit rewards; see the module docstring for the formula."""
    reward_w, reward_l = implicit_rewards(batch, beta)
    z = reward_w - reward_l
    offset = cost_margin(batch, lam)
    losses = -F.logsigmoid(z if offset is None else z - offset)
    if gamma != 0:
        losses = focal_weight(z, gamma) * losses
    return LossOutput(losses, reward_w.detach(), reward_l.detach())
