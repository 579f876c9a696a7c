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
import shutil
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from minifn import optim, schedules
from minifn.config import ModelConfig, TrainConfig
from minifn.losses import IGNORE_INDEX, LOSSES, Loss, cross_entropy
from minifn.model import Params, apply, fold_in, skeleton

Batch = tuple[Tensor, Tensor]  # (inputs, targets): [B, T], or [A, B, T] for A accumulation micro-batches


class TrainState(NamedTuple):
    params: Params
    opt_state: Any
    step: Tensor  # 0-D int64: optimizer steps taken
    rng: Tensor  # 0-D int64 key (32 bits); step k draws from fold_in(rng, k)


def init_state(params: Params, optimizer: optim.GradientTransformation, seed: int = 0) -> TrainState:
    device = next(iter(params.values())).device
    return TrainState(params, optimizer.init(params), torch.zeros((), dtype=torch.int64, device=device),
                      torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=device))


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


# ------------------------------------------------------------------------------------- compiling


def cannot_compile(device: torch.device) -> str | None:
    """Why torch.compile cannot work on this device, or None if it should."""
    if device.type == "mps":
        return "inductor does not support MPS"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++")):
        return "inductor on CPU needs a C++ compiler (install gcc or clang)"
    return None


def maybe_compile(fn: Callable, mode: str, device: torch.device) -> Callable:
    """Wrap fn in torch.compile(fullgraph=True, dynamic=False) for mode 'on', not for 'off'; 'auto'
    compiles where the platform can and falls back to eager, with one warning, where it cannot
    (including a compile that fails on its first call)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile mode {mode!r}; choose one of: auto, on, off")
    reason = cannot_compile(device)
    if mode == "off" or (mode == "auto" and reason):
        if reason and mode == "auto":
            warnings.warn(f"torch.compile unavailable ({reason}); running eagerly", stacklevel=2)
        return fn
    if reason:
        raise RuntimeError(f"--compile on is impossible here: {reason}")
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    if mode == "on":
        return compiled
    active = [compiled]

    @functools.wraps(fn)
    def with_fallback(*args, **kwargs):
        try:
            return active[0](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - auto mode promises a fallback, not a crash
            if active[0] is fn:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "running eagerly", stacklevel=2)
            active[0] = fn
            return fn(*args, **kwargs)

    return with_fallback


def make_train_step(config: ModelConfig, optimizer: optim.GradientTransformation, loss_fn: Loss = cross_entropy,
                    *, reduction: str = "mean", autocast_dtype: torch.dtype | None = None, dropout_rate: float = 0.0,
                    inplace: bool = False, compile: str = "auto", device: torch.device | str = "cpu",
                    all_reduce: Callable[[list[Tensor]], None] | None = None, rank: int = 0):
    """train_step bound to a config, optimizer and loss, compiled per `compile` (auto/on/off).

    With all_reduce (data parallel: sums a list of tensors across ranks in place), the step is two
    compiled halves with the collective between them, outside the compiled graphs; each rank folds
    its rank into the step's key, so ranks draw different dropout masks."""
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
    skeleton(config)
    step = functools.partial(eval_step, config=config, loss_fn=loss_fn, autocast_dtype=autocast_dtype)
    return maybe_compile(step, compile, torch.device(device))


def optimizer_from_config(tc: TrainConfig) -> tuple[optim.GradientTransformation, optim.Schedule]:
    """The optimizer a TrainConfig describes (clipping first when clip_grad > 0), and its schedule."""
    schedule = schedules.make(tc.scheduler, step_size=tc.step_size, gamma=tc.gamma, t_max=tc.t_max,
                              eta_min=tc.eta_min, start_factor=tc.start_factor, end_factor=tc.end_factor,
                              total_iters=tc.total_iters, warmup_steps=tc.warmup_steps)
    if tc.optimizer == "sgd":
        tx = optim.sgd(tc.lr, tc.momentum, tc.dampening, tc.weight_decay, tc.nesterov, schedule)
    else:
        make = optim.adam if tc.optimizer == "adam" else optim.adamw
        tx = make(tc.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay, tc.amsgrad, schedule)
    if tc.clip_grad > 0:
        tx = optim.chain(optim.clip_by_global_norm(tc.clip_grad), tx)
    return tx, schedule


def loss_from_config(tc: TrainConfig) -> Loss:
    """The criterion a TrainConfig names, with its label smoothing (cross-entropy only)."""
    if tc.label_smoothing:
        return functools.partial(cross_entropy, label_smoothing=tc.label_smoothing)
    return LOSSES[tc.criterion]
