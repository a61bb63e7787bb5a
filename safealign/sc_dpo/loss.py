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
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from safealign.training.data import PairData
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


# ------------------------------------------------------------------ binding settings and costs to the loop
# The training loop (safealign.training.loop.train_expert) calls ``loss(batch, beta)`` with a record that the
# step (safealign.training.step) builds without costs. Until the step forwards the data's per-pair costs, the
# method binds its settings and the pairs' costs for the length of one training run: ``CostPairData.select``
# (called by the loop right before each step) publishes the costs of the selected pairs, and ``sc_dpo`` (the
# registry entry) reads them. Outside a binding the registry entry refuses to run rather than guess.
@dataclasses.dataclass
class _Binding:
    lam: float
    gamma: float
    costs: tuple[torch.Tensor, torch.Tensor] | None = None  # (cost_w, cost_l) of the pairs selected last


_ACTIVE: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("sc_dpo_binding", default=None)


@contextlib.contextmanager
def bound(lam: float, gamma: float) -> Iterator[None]:
    """Within the block, the ``sc_dpo`` registry loss uses ``lam``, ``gamma`` and the costs ``CostPairData``
    publishes."""
    token = _ACTIVE.set(_Binding(lam, gamma))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclasses.dataclass
class CostPairData(PairData):
    """Training pairs with the safety cost of each side (N,), published to the active binding on ``select``."""

    cost_w: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))
    cost_l: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))

    def select(self, idx: torch.Tensor) -> PairData:
        binding = _ACTIVE.get()
        if binding is not None:
            binding.costs = (self.cost_w[idx], self.cost_l[idx])
        return super().select(idx)


def sc_dpo(batch: PreferenceBatch, beta: float) -> LossOutput:
    """The ``train.loss: sc_dpo`` registry entry: ``sc_dpo_loss`` with the active binding's settings and costs."""
    binding = _ACTIVE.get()
    if binding is None:
        raise ValueError("train.loss sc_dpo runs inside method sc_dpo (it needs the cost model's per-pair costs); "
                         "use `-S method=sc_dpo`")
    if batch.cost_w is None and binding.costs is not None:
        cost_w, cost_l = binding.costs
        if cost_w.shape != batch.err_w.shape:
            raise ValueError(f"sc_dpo: {cost_w.shape[0]} costs for {batch.err_w.shape[0]} pairs")
        batch = dataclasses.replace(batch, cost_w=cost_w.to(batch.err_w), cost_l=cost_l.to(batch.err_w))
    return sc_dpo_loss(batch, beta, binding.lam, binding.gamma)
