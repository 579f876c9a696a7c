"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A.1), from the micro-batch gradients a step computes anyway.

The mean gradient G_B of B samples has E|G_B|^2 = |G|^2 + tr(Sigma) / B. The micro-batches of a step are
the small batches (on every rank, under data parallel) and the whole step is the big one, so two
measured norms give two equations in |G|^2 and tr(Sigma). minifn counts B in target tokens (the loss is
a mean per token), so B_simple is in tokens, and micro-batches of unequal size (padding, a short last
group) are handled by averaging 1 / B_small; with equal sizes this is exactly the paper's estimator:
    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
Each step's estimate is unbiased but noisy; the training log smooths numerator and denominator separately
(`log_fields`, an EMA restarted on resume) and reports their ratio, as the paper recommends.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def small_batch_sums(grad_norm: Tensor, tokens: Tensor) -> Tensor:
    """[|G_a|^2, 1 / B_a, 1] in float64 for one micro-batch whose summed gradient has norm grad_norm over
    tokens targets (zeros for a micro-batch without targets). Sums of these add up over micro-batches and ranks."""
    has = tokens > 0
    n = tokens.clamp(min=1).double()
    one = has.double()
    return torch.stack(torch.broadcast_tensors((grad_norm.double() / n).square() * one, one / n, one), dim=-1)


def moments(small: Tensor, big_sq: Tensor, big_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Estimates (|G|^2, tr(Sigma)) per token, from the small batches' summed small_batch_sums and the
    big batch's |G_big|^2 (mean gradient over all big_tokens targets). NaN with fewer than two small batches."""
    sq_sum, inv_sum, count = small.unbind(-1)
    inv_big = 1 / big_tokens.double()
    trace = (sq_sum / count - big_sq) / (inv_sum / count - inv_big)
    trace = torch.where(count >= 2, trace, torch.nan)
    return big_sq - trace * inv_big, trace


METRICS = ("gns_g2", "gns_trace")  # what train_step(..., log_gns=True) adds to its metrics


class Smoothed(NamedTuple):
    """Running averages of the per-step estimates (their debiasing would cancel in the ratio)."""

    g2: float = 0.0
    trace: float = 0.0


def log_fields(s: Smoothed, g2: float | None = None, trace: float | None = None,
               beta: float = 0.95) -> tuple[Smoothed, dict]:
    """(new averages, the step's log fields): gns_g2 and gns_trace as estimated, and gns, the smoothed B_simple
    in tokens (None while undefined). A non-finite estimate is skipped; no estimates give no fields."""
    if g2 is None:
        return s, {}
    finite = math.isfinite(g2) and math.isfinite(trace)
    if finite:
        s = Smoothed(beta * s.g2 + (1 - beta) * g2, beta * s.trace + (1 - beta) * trace)
    return s, {"gns_g2": g2 if finite else None, "gns_trace": trace if finite else None,
               "gns": s.trace / s.g2 if s.g2 > 0 else None}
