"""One preference-optimisation step on a batch of pairs, for any model family and any loss and terms.

The preferred and rejected images of a pair share one timestep and one noise draw, and go through the denoiser
in one batched forward pass; rows that a term brings (anchor rows) ride in the same pass, each with its own
timestep and noise. The reference is the same denoiser with its adapters disabled, under no_grad (no second
UNet in memory). The objective is ``reduce(loss(pairs).losses) + sum_k weight_k * term_k``
(``safealign.training.terms``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from safealign.families.base import Cond, Family, cond_cat
from safealign.training.losses import LossFn, PreferenceBatch, reduce
from safealign.training.terms import ActiveTerm, TermInputs, difference_weights, per_sample_error, weighted_error


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    accuracy: float  # share of pairs with reward_w > reward_l (implicit accuracy)
    margin: float  # mean reward_w - reward_l
    err_w: float  # mean denoising error of the preferred images under the model
    err_l: float
    terms: dict[str, float] = field(default_factory=dict)  # each active term's (unweighted) value


@dataclass
class StepDraws:
    """What a step draws at random, given instead: timesteps (B,) and noise (B, C, h, w) of the pairs, and per
    term that brings rows, the rows' (timesteps, noise)."""

    t: torch.Tensor
    noise: torch.Tensor
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def global_draws(fam: Family, batch: int, shape: Sequence[int], rows: Sequence[tuple[str, int, Sequence[int]]],
                 generator: torch.Generator, part: slice) -> StepDraws:
    """The draws ``preference_step`` would make from ``generator`` for the whole batch (in its order), cut to
    ``part`` (this process's share): N processes then see the same timesteps and noise per pair as one process.
    ``rows``: (term name, rows in the whole batch, row shape) of each term that brings rows, in order."""
    t = torch.randint(0, fam.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn((batch, *shape), generator=generator)
    drawn = {}
    for name, n, row_shape in rows:
        r_t = torch.randint(0, fam.num_train_timesteps, (n,), generator=generator)
        drawn[name] = (r_t[part], torch.randn((n, *row_shape), generator=generator)[part])
    return StepDraws(t[part], noise[part], drawn)


def preference_step(fam: Family, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Cond, loss_fn: LossFn, beta: float,
                    generator: torch.Generator, terms: Sequence[ActiveTerm] = (),
                    weight: torch.Tensor | None = None, cost_w: torch.Tensor | None = None,
                    cost_l: torch.Tensor | None = None, draws: StepDraws | None = None,
                    focus: float = 0.0) -> StepOutput:
    """x0_w, x0_l: (B, C, h, w) in model space; cond: the condition of each pair (B rows); ``weight``: optional
    per-pair weights (B,) of the reduction; ``cost_w`` / ``cost_l``: optional per-pair safety costs (B,), passed
    to the loss in the record. ``terms``: weighted extra terms, rows (x0 (A, C, h, w), cond) given for the terms
    that bring rows. ``draws``: the timesteps and noise, drawn by the caller (a process's share of a global
    batch's draws, so that N processes train as one); None draws them here from ``generator``."""
    b = x0_w.shape[0]
    if draws is None:
        t = torch.randint(0, fam.num_train_timesteps, (b,), generator=generator).to(fam.device)
        noise = torch.randn(x0_w.shape, generator=generator).to(x0_w)
    else:
        t, noise = draws.t.to(fam.device), draws.noise.to(x0_w)
    x0 = torch.cat([x0_w, x0_l])  # (2B, C, h, w): preferred first, then rejected
    noise2, t2, cond2 = torch.cat([noise, noise]), torch.cat([t, t]), cond_cat([cond, cond])
    x_t = fam.add_noise(x0, noise2, t2)
    target = fam.target(x0, noise2, t2)
    slices: dict[str, slice] = {}
    for term in terms:
        if term.rows is None or not term.term.forward:
            continue
        r_x0, r_cond = term.rows
        if draws is None:
            r_t = torch.randint(0, fam.num_train_timesteps, (r_x0.shape[0],), generator=generator).to(fam.device)
            r_noise = torch.randn(r_x0.shape, generator=generator).to(r_x0)
        else:
            r_t, r_noise = (d.to(r_x0.device) for d in draws.rows[term.term.name])
            r_noise = r_noise.to(r_x0)
        slices[term.term.name] = slice(x_t.shape[0], x_t.shape[0] + r_x0.shape[0])
        x_t = torch.cat([x_t, fam.add_noise(r_x0, r_noise, r_t)])
        t2, cond2 = torch.cat([t2, r_t]), cond_cat([cond2, r_cond])
    pred = fam.predict(x_t, t2, cond2)
    with torch.no_grad(), fam.adapters_disabled():
        ref = fam.predict(x_t, t2, cond2)
    if focus:
        w = difference_weights(x0_w, x0_l, focus)
        w2 = torch.cat([w, w])
        err_w, err_l = weighted_error(pred[: 2 * b], target, w2).chunk(2)
        ref_w, ref_l = weighted_error(ref[: 2 * b], target, w2).chunk(2)
    else:
        err_w, err_l = per_sample_error(pred[: 2 * b], target).chunk(2)
        ref_w, ref_l = per_sample_error(ref[: 2 * b], target).chunk(2)
    pairs = PreferenceBatch(err_w, err_l, ref_w, ref_l, weight=weight, cost_w=cost_w, cost_l=cost_l)
    out = loss_fn(pairs, beta)
    loss = reduce(out.losses, weight)
    values: dict[str, float] = {}
    for term in terms:
        sl = slices.get(term.term.name)
        cond_rows = term.rows[1] if term.rows is not None and not term.term.forward else None
        value = term.term(TermInputs(pairs, pred[sl] if sl else None, ref[sl] if sl else None, cond_rows, fam))
        loss = loss + term.weight * value
        values[term.term.name] = value.item()
    return StepOutput(
        loss=loss,
        accuracy=(out.reward_w > out.reward_l).float().mean().item(),
        margin=(out.reward_w - out.reward_l).mean().item(),
        err_w=err_w.mean().item(),
        err_l=err_l.mean().item(),
        terms=values,
    )
