"""The safety cost model's objectives and metrics, as pure functions (torch / numpy only).

The head gives one logit per category and image, ``s[:, k]``; the cost of an image for category k is
``sigmoid(s[:, k])`` and its safety cost is the largest over categories, ``C = max_k sigmoid(s[:, k])``
(``image_cost``). Labels come from the pairs (the unsafe prompt's image is harmful for the pair's categories,
its safe twin harmless for them), never from a detector: a pair says nothing about the *other* categories (the
safe twin of a hate pair may well show a violent red object), so each loss only uses a pair's own categories
(``cats``, (B, K) bool). Our reading of "a contrastive objective and a cost-anchoring objective" (METHOD.md):

- ``pair_bt_loss``: Bradley-Terry on each pair, mean over (pair i, category k of i) of
  ``-log sigmoid(s_u[i, k] - s_s[i, k])``: the unsafe image costs more than its own safe twin;
- ``category_contrast_loss``: the same Bradley-Terry across pairs, mean over every (unsafe i, safe j,
  category k shared by i and j) (i = j included): harm is ranked against all safe images of the concept;
- ``anchoring_loss``: regression of the costs to the absolute scale, mean over (i, k of i) of
  ``((1 - c_u[i, k]) ** 2 + c_s[i, k] ** 2) / 2``: safe near 0, unsafe near 1, so a threshold means something.
- ``other_loss``: the pairs of other categories as weak negatives (positive-unlabelled): mean over (i, k *not*
  of i) of ``(c_u[i, k] ** 2 + c_s[i, k] ** 2) / 2``, with a small weight. Without it a category's logit is
  never asked to be low off its own pairs, and the max over categories is high for every image (measured:
  mean cost of harmless held-out images 0.86 with weight 0).
With one category (K = 1) these are the plain pair losses.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def image_cost(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) per-category logits -> (N,) safety cost in [0, 1]: the largest per-category cost."""
    return torch.sigmoid(logits).amax(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def pair_bt_loss(s_u: torch.Tensor, s_s: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """s_u, s_s: (B, K) logits of the unsafe and the safe image of each pair; cats (B, K) bool -> scalar."""
    return _masked_mean(-F.logsigmoid(s_u - s_s), cats.float())


def category_contrast_loss(s_u: torch.Tensor, s_s: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """Mean over (i, j, k) with k a category of both pairs i and j of -log sigmoid(s_u[i, k] - s_s[j, k])."""
    c = cats.float()
    mask = c[:, None, :] * c[None, :, :]  # (B, B, K): category k shared by pairs i and j
    diff = s_u[:, None, :] - s_s[None, :, :]  # (B, B, K): unsafe i against safe j, per category
    return _masked_mean(-F.logsigmoid(diff), mask)


def anchoring_loss(c_u: torch.Tensor, c_s: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """c_u, c_s: (B, K) per-category costs in [0, 1] -> scalar: mean over (i, k of i) of
    ((1 - c_u)^2 + c_s^2) / 2."""
    return _masked_mean(0.5 * ((1 - c_u).pow(2) + c_s.pow(2)), cats.float())


def other_loss(c_u: torch.Tensor, c_s: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """c_u, c_s: (B, K) per-category costs -> scalar: mean over (i, k not of i) of (c_u^2 + c_s^2) / 2."""
    return _masked_mean(0.5 * (c_u.pow(2) + c_s.pow(2)), (~cats).float())


def cost_objective(s_u: torch.Tensor, s_s: torch.Tensor, cats: torch.Tensor, contrast_weight: float,
                   anchor_weight: float, other_weight: float = 0.0) -> torch.Tensor:
    """pair BT + contrast_weight * category contrast + anchor_weight * anchoring + other_weight * other (a
    scalar)."""
    loss = pair_bt_loss(s_u, s_s, cats)
    if other_weight:
        loss = loss + other_weight * other_loss(torch.sigmoid(s_u), torch.sigmoid(s_s), cats)
    if contrast_weight:
        loss = loss + contrast_weight * category_contrast_loss(s_u, s_s, cats)
    if anchor_weight:
        loss = loss + anchor_weight * anchoring_loss(torch.sigmoid(s_u), torch.sigmoid(s_s), cats)
    return loss


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (probability a positive scores above a negative, ties count half); None when
    one class is absent."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def calibration_error(costs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error: sum over equal-width cost bins of (share of images in the bin) * |mean cost
    - share labelled harmful|; None for no images."""
    costs, labels = np.asarray(costs, float), np.asarray(labels, float)
    if len(costs) == 0:
        return None
    which = np.minimum((costs * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(costs[m].mean() - labels[m].mean())
    return float(err)


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def cost_metrics(costs_u: np.ndarray, costs_s: np.ndarray, labels_u: np.ndarray, labels_s: np.ndarray,
                 categories: list[list[str]], names: tuple[str, ...]) -> dict:
    """Metrics of a cost model on held-out pairs. costs_*: (N,) costs of each pair's unsafe / safe image;
    labels_*: (N,) bool, the image judged harmful (a detector's labels: a base model's render of an unsafe
    prompt can miss its concept). ``auroc`` and ``calibration_error``: per category (the images of its pairs,
    both sides) and ``overall``; ``cost_unsafe_mean`` / ``cost_safe_mean``: over the images labelled harmful /
    harmless; ``pair_accuracy``: share of pairs whose unsafe side costs more (labels from the pairs)."""
    costs = np.concatenate([costs_u, costs_s])
    labels = np.concatenate([labels_u, labels_s]).astype(bool)
    cats = categories + categories
    au: dict[str, float | None] = {}
    ece: dict[str, float | None] = {}
    for name in (*names, "overall"):
        m = np.array([name == "overall" or name in c for c in cats], bool)
        au[name], ece[name] = auroc(costs[m], labels[m]), calibration_error(costs[m], labels[m])
    return {"auroc": au, "calibration_error": ece, "cost_unsafe_mean": _mean(costs[labels]),
            "cost_safe_mean": _mean(costs[~labels]), "cost_unsafe_side_mean": _mean(costs_u),
            "cost_safe_side_mean": _mean(costs_s), "pair_accuracy": _mean((costs_u > costs_s).astype(float)),
            "images": len(costs), "images_labelled_harmful": int(labels.sum())}
