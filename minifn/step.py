"""One training step as a pure function of (state, batch), and the factory that compiles it.

`train_step` computes the loss and gradients with `torch.func.grad_and_value` over the parameter
tree, sums them over gradient-accumulation micro-batches, and applies the stateless optimizer. The
state is data (a NamedTuple of trees and 0-D tensors), so a research script can call the step in a
loop, checkpoint the state as tensors, or swap parameter trees in and out. Randomness (dropout) is
keyed JAX-style: each step folds its step number into the state's key, so nothing hidden changes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from minifn import optim, rng
from minifn.compiling import maybe_compile
from minifn.config import ModelConfig
from minifn.losses import IGNORE_INDEX, Loss, cross_entropy
from minifn.model import Params, apply, skeleton
from minifn.rng import fold_in

Batch = tuple[Tensor, Tensor]  # (inputs, targets): [B, T], or [A, B, T] for A accumulation micro-batches


class TrainState(NamedTuple):
    params: Params
    opt_state: Any
    step: Tensor  # 0-D int64: optimizer steps taken
    rng: Tensor  # 0-D int64 key (32 bits); step k draws from fold_in(rng, k)


def init_state(params: Params, optimizer: optim.GradientTransformation, seed: int = 0) -> TrainState:
    device = next(iter(params.values())).device
    return TrainState(params, optimizer.init(params), torch.zeros((), dtype=torch.int64, device=device),
                      rng.key(seed, device))


def _autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to dtype, or no context at all: even a disabled autocast region in the graph makes
    AOTAutograd's cache refuse it, and every process start would then redo AOTAutograd."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _summed_loss(params, inputs, targets, config, loss_fn, autocast_dtype, dropout_rate, key):
    """The loss summed over target tokens (differentiated), twice: as output and as auxiliary value."""
    with _autocast(inputs.device.type, autocast_dtype):
        logits = apply(params, inputs, config, dropout_rate=dropout_rate, key=key)
    total = loss_fn(logits, targets, reduction="sum")
    return total, total.detach()


def loss_and_grads(params: Params, batch: Batch, key: Tensor | None = None, *, config: ModelConfig,
                   loss_fn: Loss = cross_entropy, autocast_dtype: torch.dtype | None = None,
                   dropout_rate: float = 0.0) -> tuple[Params, Tensor, Tensor]:
    """(gradients of the summed loss, summed loss, target count) over all micro-batches of batch.

    Sums, not means: they add up exactly across micro-batches and across data-parallel ranks, and
    apply_gradients divides once by the global count. Micro-batch a drops out with fold_in(key, a)."""
    inputs, targets = batch
    if inputs.ndim == 2:
        inputs, targets = inputs[None], targets[None]
    grad_fn = torch.func.grad_and_value(_summed_loss, has_aux=True)
    grads, loss_sum = None, 0.0
    for a, (x, y) in enumerate(zip(inputs.unbind(0), targets.unbind(0))):  # A is static: unrolled when compiled
        micro_key = None if key is None else fold_in(key, a)
        g, (_, total) = grad_fn(params, x, y, config, loss_fn, autocast_dtype, dropout_rate, micro_key)
        grads = g if grads is None else optree.tree_map(torch.add, grads, g)
        loss_sum = loss_sum + total
    return grads, loss_sum, (targets != IGNORE_INDEX).sum()


def apply_gradients(state: TrainState, grads: Params, loss_sum: Tensor, tokens: Tensor, *,
                    optimizer: optim.GradientTransformation, reduction: str = "mean",
                    inplace: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
    """Normalise summed gradients (per target token for 'mean') and take one optimizer step."""
    count = tokens.clamp(min=1)
    if reduction == "mean":
        grads = optree.tree_map(lambda g: g / count.to(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates)
    if inplace:
        params = optim.assign_(state.params, params)
        opt_state = optim.assign_(state.opt_state, opt_state)
    metrics = {"loss": loss_sum / count, "grad_norm": optim.global_norm(grads), "tokens": tokens}
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics


def step_key(state: TrainState) -> Tensor:
    """The RNG key of the step about to be taken."""
    return fold_in(state.rng, state.step)


def train_step(state: TrainState, batch: Batch, *, config: ModelConfig, optimizer: optim.GradientTransformation,
               loss_fn: Loss = cross_entropy, reduction: str = "mean", autocast_dtype: torch.dtype | None = None,
               dropout_rate: float = 0.0, inplace: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
    """One optimizer step. Metrics: loss (mean per target token), grad_norm, tokens (targets counted).

    inplace=True writes the new parameters and optimizer state into the input tensors (the same
    values, bit for bit) so a compiled step keeps one copy of each tree."""
    key = step_key(state) if dropout_rate else None
    grads, loss_sum, tokens = loss_and_grads(state.params, batch, key, config=config, loss_fn=loss_fn,
                                             autocast_dtype=autocast_dtype, dropout_rate=dropout_rate)
    return apply_gradients(state, grads, loss_sum, tokens, optimizer=optimizer, reduction=reduction, inplace=inplace)


def eval_step(params: Params, batch: Batch, *, config: ModelConfig, loss_fn: Loss = cross_entropy,
              autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Summed loss and target count of one [B, T] batch, without gradients."""
    inputs, targets = batch
    with torch.no_grad(), _autocast(inputs.device.type, autocast_dtype):
        logits = apply(params, inputs, config)
    return {"loss_sum": loss_fn(logits, targets, reduction="sum"), "tokens": (targets != IGNORE_INDEX).sum()}


def make_train_step(config: ModelConfig, optimizer: optim.GradientTransformation, loss_fn: Loss = cross_entropy,
                    *, reduction: str = "mean", autocast_dtype: torch.dtype | None = None, dropout_rate: float = 0.0,
                    inplace: bool = False, compile: str = "auto", device: torch.device | str = "cpu",
                    all_reduce: Callable[[list[Tensor]], None] | None = None, rank: int = 0):
    """train_step bound to a config, optimizer and loss, compiled per `compile`: step(state, batch).

    Args:
      config: the model's shape.
      optimizer: a GradientTransformation (its hyperparameters live in the state, not here).
      loss_fn: loss(logits, targets, reduction) over [B, T, V] logits; targets equal to IGNORE_INDEX are skipped.
      reduction: 'mean' divides the summed gradients by the number of target tokens, 'sum' does not.
      autocast_dtype: run the forward pass under autocast to this dtype (None: no autocast region at all).
      dropout_rate: dropout on the embedding and residual branches, keyed by the state's RNG key and step.
      inplace: write the new state into the input tensors (one copy of the trees; the values are identical).
      compile: 'auto', 'on' or 'off' (see minifn.compiling).
      device: where the state lives; decides whether compiling is possible.
      all_reduce: data parallel only: sums a list of tensors across ranks in place. The step is then two
        compiled halves with the collective between them, outside the compiled graphs.
      rank: data parallel only: folded into the step's key, so ranks draw different dropout masks."""
    skeleton(config)  # build the module skeleton outside any compiled region
    device = torch.device(device)
    if all_reduce is None:
        step = functools.partial(train_step, config=config, optimizer=optimizer, loss_fn=loss_fn, reduction=reduction,
                                 autocast_dtype=autocast_dtype, dropout_rate=dropout_rate, inplace=inplace)
        return maybe_compile(step, compile, device)
    grads_fn = maybe_compile(functools.partial(loss_and_grads, config=config, loss_fn=loss_fn,
                                               autocast_dtype=autocast_dtype, dropout_rate=dropout_rate),
                             compile, device)
    apply_fn = maybe_compile(functools.partial(apply_gradients, optimizer=optimizer, reduction=reduction,
                                               inplace=inplace), compile, device)

    def data_parallel_step(state: TrainState, batch: Batch):
        key = fold_in(step_key(state), rank) if dropout_rate else None
        grads, loss_sum, tokens = grads_fn(state.params, batch, key)
        all_reduce([*optree.tree_leaves(grads), loss_sum, tokens])
        return apply_fn(state, grads, loss_sum, tokens)

    return data_parallel_step


def make_eval_step(config: ModelConfig, loss_fn: Loss = cross_entropy, *, autocast_dtype=None,
                   compile: str = "auto", device: torch.device | str = "cpu"):
    """eval_step bound to a config and loss, compiled per `compile`: step(params, batch) -> sums."""
    skeleton(config)
    step = functools.partial(eval_step, config=config, loss_fn=loss_fn, autocast_dtype=autocast_dtype)
    return maybe_compile(step, compile, torch.device(device))
