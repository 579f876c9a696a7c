"""Losses of next-token logits [B, T, V] against target ids [B, T]; positions whose target is
`ignore_index` (padding) never count."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
Loss = Callable[..., Tensor]


def _reduce(per_position: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction not in ("none", "sum", "mean"):  # else any other name would silently mean 'mean'
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    per_position = per_position * valid
    if reduction == "none":
        return per_position
    total = per_position.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="mean", label_smoothing=0.0):
    """Token-level cross-entropy in nats, as F.cross_entropy over the flattened positions.

    Eager, aten's fused kernel is the faster; compiled, the logsumexp form is (see its docstring)."""
    if torch.compiler.is_compiling():
        losses = logsumexp_cross_entropy(logits, targets, label_smoothing)
    else:
        losses = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                                 reduction="none", label_smoothing=label_smoothing).view_as(targets)
    return _reduce(losses, targets != ignore_index, reduction)


def logsumexp_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-position cross-entropy as logsumexp(z) - z[target] (smoothed: minus a share of mean(z) instead).

    The same function as F.cross_entropy, written so that inductor saves only the [B, T] logsumexp for the
    backward pass, not F.cross_entropy's [B, T, V] log-probabilities, and fuses the loss and its gradient
    into one pass over the logits: z[target] is picked by comparing with the vocabulary's indices, which
    fuses, where a gather's backward (a scatter into zeros) took a pass of its own (benchmarks/loss_forms.py).
    Padding targets (outside [0, V)) pick nothing; mask them."""
    z = logits.float()
    is_target = torch.arange(z.shape[-1], device=z.device) == targets.unsqueeze(-1)
    target_logit = torch.where(is_target, z, 0.0).sum(-1)
    lse = torch.logsumexp(z, -1)
    if not label_smoothing:
        return lse - target_logit
    return lse - (1 - label_smoothing) * target_logit - label_smoothing * z.mean(-1)


def _target_prob(logits, targets, ignore_index):
    probs = logits.float().softmax(-1)
    p_target = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return probs, p_target, targets != ignore_index


def mse(logits, targets, ignore_index=IGNORE_INDEX, reduction="mean"):
    """Brier score: sum over the vocabulary of (softmax(logits) - one_hot(target))^2, per position.

    Computed as sum(p^2) - 2 p_target + 1, which never builds the [B, T, V] one-hot."""
    probs, p_target, valid = _target_prob(logits, targets, ignore_index)
    return _reduce(probs.square().sum(-1) - 2 * p_target + 1, valid, reduction)


def mae(logits, targets, ignore_index=IGNORE_INDEX, reduction="mean"):
    """L1 distance between softmax(logits) and one_hot(target), summed over the vocabulary: 2 (1 - p_target)."""
    _, p_target, valid = _target_prob(logits, targets, ignore_index)
    return _reduce(2 * (1 - p_target), valid, reduction)


LOSSES: dict[str, Loss] = {"cross_entropy": cross_entropy, "mse": mse, "mae": mae}


def perplexity(mean_cross_entropy: float) -> float:
    """exp of a mean cross-entropy in nats, capped at exp(700) so that a diverged loss reads as a huge number
    rather than an overflow."""
    return math.exp(min(mean_cross_entropy, 700))
