"""Weighted extra terms of the training objective, summed onto the preference loss (as TRL sums weighted loss
types). Each term keeps its own params key under ``train`` for its weight; weight 0 switches it off and then it
costs nothing. A new term is a class here and a field in ``safealign.core.params.Train``: the step and the loop
take any list of terms, with no new parameter.

A term sees a ``TermInputs``: the pairs' per-pair record (``PreferenceBatch``, differentiable) and, for a term that
brings rows of its own (``rows_from`` names them; the loop samples ``batch_param`` of them per step), the
trained and reference models' predictions on those rows, which ride in the same forward pass as the pairs.

- ``sft`` (``train.sft_weight``): mean err_w, the denoising error of the preferred image under the condition
  prompt, as RPO adds the chosen answer's NLL to DPO. DPO alone only asks the preferred image to become likelier
  *relative to* the rejected one; on the toy world it walked past the safe twin (yellow -> red, another unsafe
  colour, instead of orange). Costs no extra pass.
- ``anchor`` (``train.anchor_weight``): on anchor rows (the safe prompts of the training pairs, with their
  images) the mean squared difference between the trained and the reference model's predictions. The DPO loss
  only constrains the pairs' own prompts; without it an expert that learns "red -> blue" also turns purple
  prompts blue (measured on the toy world).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from safealign.training.losses import PreferenceBatch


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def difference_weights(x0_w: torch.Tensor, x0_l: torch.Tensor, focus: float) -> torch.Tensor:
    """Per-position weights of a pair's denoising errors, (B, 1, ...): ``(1 - focus) + focus * d / mean(d)`` with
    ``d`` the absolute difference of the two images summed over channels, so each pair's weights average 1 and
    ``focus`` of them sit where its images differ (``train.focus``; 0 = uniform, the paper's error). Positions
    where the images agree add the same error to both sides of the preference margin, so the margin never depends
    on them: weighting scales a pair's margin by its weight on the differing positions, up to (area)^-1 at focus
    1, a per-pair beta inversely proportional to how much of the image the safe edit touches (pink -> white on a
    small object is a few percent of the pixels). The supervised term's err_w is weighted the same way."""
    d = (x0_w.float() - x0_l.float()).abs().sum(1, keepdim=True)
    mean = d.flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (d.dim() - 1))
    return (1 - focus) + focus * d / mean


def weighted_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``per_sample_error`` with per-position weights broadcast over channels: (N, ...) -> (N,)."""
    return ((pred.float() - target.float()).pow(2) * weights).flatten(1).mean(1)


def anchor_loss(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """Mean over anchor rows of the squared difference between model and reference predictions (a scalar)."""
    return per_sample_error(pred, ref_pred.detach()).mean()


@dataclasses.dataclass(frozen=True)
class TermInputs:
    pairs: PreferenceBatch
    pred: torch.Tensor | None = None  # the trained model's predictions on the term's own rows (A, ...)
    ref: torch.Tensor | None = None  # the reference's, same rows, no gradient
    cond: dict[str, torch.Tensor] | None = None  # the term's rows' condition (terms with ``forward = False``)
    family: Any = None  # the model family being trained (terms that read its modules)


class Term:
    name: ClassVar[str]
    param: ClassVar[str]  # key under `train` holding the weight
    rows_from: ClassVar[str | None] = None  # name of the row data the loop supplies (None: no rows of its own)
    batch_param: ClassVar[str | None] = None  # key under `train`: rows per step
    log_column: ClassVar[str | None] = None  # column of the per-step CSV log (None: not logged)
    forward: ClassVar[bool] = True  # its rows ride in the denoiser's pass (False: the term reads only their cond)

    def __call__(self, inputs: TermInputs) -> torch.Tensor:  # a differentiable scalar
        raise NotImplementedError


class SupervisedTerm(Term):
    name, param = "sft", "sft_weight"

    def __call__(self, inputs: TermInputs) -> torch.Tensor:
        return inputs.pairs.err_w.mean()


class AnchorTerm(Term):
    name, param = "anchor", "anchor_weight"
    rows_from, batch_param, log_column = "anchors", "anchor_batch_size", "anchor"

    def __call__(self, inputs: TermInputs) -> torch.Tensor:
        assert inputs.pred is not None and inputs.ref is not None, "the anchor term needs its rows' predictions"
        return anchor_loss(inputs.pred, inputs.ref)


def relative_edit(h: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``sum ||scaling * B A h||^2 / sum ||W h||^2`` over the rows of ``h`` (tokens, in_features): how much a LoRA
    (A: (r, in), B: (out, r)) changes a linear layer's outputs (W: (out, in)) on these inputs, relative to them.
    The base outputs carry no gradient."""
    h = h.reshape(-1, h.shape[-1]).to(lora_a.dtype)
    delta = scaling * (h @ lora_a.T) @ lora_b.T
    with torch.no_grad():
        base = (h @ weight.to(h.dtype).T).pow(2).sum()
    return delta.pow(2).sum() / base.clamp_min(1e-12)


class PreserveTerm(Term):
    name, param = "preserve", "preserve_weight"
    rows_from, batch_param, log_column = "anchors", "preserve_batch_size", "preserve"
    forward = False

    def __call__(self, inputs: TermInputs) -> torch.Tensor:
        assert inputs.cond is not None and inputs.family is not None, "the preserve term needs its rows' condition"
        parts = [relative_edit(h, m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight,
                               m.scaling["default"])
                 for h, m in inputs.family.condition_modules(inputs.cond)]
        if not parts:
            raise ValueError("train.preserve_weight > 0: no LoRA module reads the text condition; add "
                             "cross-attention keys or values (attn2.to_k, attn2.to_v) to train.targets")
        return torch.stack(parts).mean()


TERMS: tuple[Term, ...] = (SupervisedTerm(), AnchorTerm(), PreserveTerm())  # summed in this order


@dataclasses.dataclass(frozen=True)
class ActiveTerm:
    """A term with its weight, and the rows it brings this step (x0, cond) when it has rows."""

    term: Term
    weight: float
    rows: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None


def active_terms(cfg: Any) -> list[Term]:
    """The terms whose weight under ``cfg`` (params.train) is > 0, in summation order."""
    return [t for t in TERMS if getattr(cfg, t.param) > 0]


LOG_TERMS = tuple(t.log_column for t in TERMS if t.log_column)
