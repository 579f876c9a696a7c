"""One training step as a pure function of (state, batch), and the factory that compiles it.

`train_step` computes the loss and gradients with `torch.func.grad_and_value` over the parameter
tree, sums them over gradient-accumulation micro-batches, and applies the stateless optimizer. The
state is data (a NamedTuple of trees and 0-D tensors), so a research script can call the step in a
loop, checkpoint the state as tensors, or swap parameter trees in and out. Randomness (dropout) is
keyed JAX-style: each step folds its step number into the state's key, so nothing hidden changes.
Optionally the state keeps a moving average of the parameters (minifn.ema), and the step estimates
the gradient noise scale from its micro-batches (minifn.noise).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from minifn import ema as moving_average
from minifn import noise, optim, rng, trees
from minifn.compiling import DROPOUT_OPTIONS, maybe_compile
from minifn.config import ModelConfig
from minifn.losses import IGNORE_INDEX, Loss, cross_entropy
from minifn.model import Params, apply, check_params, skeleton
from minifn.rng import fold_in

Batch = tuple[Tensor, Tensor]  # (inputs, targets): [B, T], or [A, B, T] for A accumulation micro-batches


class TrainState(NamedTuple):
    params: Params
    opt_state: Any
    step: Tensor  # 0-D int64: optimizer steps taken
    rng: Tensor  # 0-D int64 key (32 bits); step k draws from fold_in(rng, k)
    ema: Params | tuple = ()  # moving average of params (same tree), or () without EMA: no leaves, no work
    ema_decay: Tensor | tuple = ()  # 0-D float64 decay of the average (data: a new value does not recompile)


def init_state(params: Params, optimizer: optim.GradientTransformation, seed: int = 0,
               ema: float = 0.0) -> TrainState:
    """A fresh state; ema > 0 keeps a moving average of the parameters with that decay (see minifn.ema)."""
    device = next(iter(params.values())).device
    state = TrainState(params, optimizer.init(params), torch.zeros((), dtype=torch.int64, device=device),
                       rng.key(seed, device))
    return with_ema(state, ema) if ema else state


def with_ema(state: TrainState, decay: float) -> TrainState:
    """state with an average of decay (started from the current parameters if it has none), or none for 0."""
    if not 0 <= decay < 1:
        raise ValueError(f"the EMA's decay must be in [0, 1) (0: no average), got {decay}")
    if not decay:
        return state._replace(ema=(), ema_decay=())
    ema = state.ema if optree.tree_leaves(state.ema) else optree.tree_map(torch.clone, state.params)
    return state._replace(ema=ema, ema_decay=torch.tensor(float(decay), dtype=torch.float64, device=state.step.device))


def _autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to dtype, or no context at all: even a disabled autocast region in the graph makes
    AOTAutograd's cache refuse it, and every process start would then redo AOTAutograd."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _summed_loss(params, inputs, targets, config, loss_fn, autocast_dtype, dropout_rate, key, divisor):
    """The loss summed over target tokens, divided by divisor (if any) to be differentiated, and as it is
    as the auxiliary value."""
    with _autocast(inputs.device.type, autocast_dtype):
        logits = apply(params, inputs, config, dropout_rate=dropout_rate, key=key)
    total = loss_fn(logits, targets, reduction="sum")
    return total if divisor is None else total / divisor.to(total.dtype), total.detach()


def _grad_and_value(fn: Callable) -> Callable:
    """torch.func.grad_and_value(fn, has_aux=True) over the first argument, a tree of tensors.

    functorch always differentiates with create_graph=True (so that a transform can sit on top), which
    keeps every forward activation alive until the backward pass ends: twice the peak memory of
    `loss.backward()` at the bench shape. At the outermost level of an eager call (no transform around
    it, nothing asking for a second derivative, not being compiled) no one can use that graph, so this
    runs the same forward and backward through torch.autograd.grad, which frees each activation as the
    backward consumes it. Same kernels, but the engine sums some gradient contributions in another order,
    so the gradients agree with functorch's to rounding (1e-7, tested), not bit for bit. Compiled,
    AOTAutograd traces the functorch call and plans memory itself."""
    transformed = torch.func.grad_and_value(fn, has_aux=True)

    def run(params, *args):
        leaves = trees.leaves(params)
        if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or any(x.requires_grad for x in leaves)):
            return transformed(params, *args)
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in leaves]
            loss, aux = fn(trees.rebuild(params, inputs), *args)
            grads = torch.autograd.grad(loss, inputs)
        return trees.rebuild(params, list(grads)), (loss.detach(), aux)

    return run


def loss_and_grads(params: Params, batch: Batch, key: Tensor | None = None, *, config: ModelConfig,
                   loss_fn: Loss = cross_entropy, autocast_dtype: torch.dtype | None = None,
                   dropout_rate: float | Tensor = 0.0, log_gns: bool = False, divisor: Tensor | None = None):
    """(gradients of the summed loss, summed loss, target count, small-batch sums or None) over all
    micro-batches of batch.

    Sums, not means: they add up exactly across micro-batches and across data-parallel ranks, and
    apply_gradients divides once by the global count. A divisor (0-D, e.g. that count when it is known
    before the backward pass) divides the loss that is differentiated instead, so the gradients come out
    divided at no cost; the summed loss stays a sum. Micro-batch a drops out with fold_in(key, a).
    log_gns adds each micro-batch's noise.small_batch_sums, a [3] float64 tensor, for the noise scale."""
    inputs, targets = batch
    if inputs.ndim == 2:
        inputs, targets = inputs[None], targets[None]
    grad_fn = _grad_and_value(_summed_loss)
    grads, loss_sum, small = None, 0.0, None
    for a, (x, y) in enumerate(zip(inputs.unbind(0), targets.unbind(0))):  # A is static: unrolled when compiled
        micro_key = None if key is None else fold_in(key, a)
        g, (_, total) = grad_fn(params, x, y, config, loss_fn, autocast_dtype, dropout_rate, micro_key, divisor)
        if grads is None:
            grads, first = trees.leaves(g), g
        else:  # grads are this function's own, so the sum accumulates in place
            grads = optim.foreach("add_", grads, trees.leaves(g))
        loss_sum = loss_sum + total
        if log_gns:
            norm = optim.global_norm(g) * (1 if divisor is None else divisor)  # of the summed gradient
            sums = noise.small_batch_sums(norm, (y != IGNORE_INDEX).sum())
            small = sums if small is None else small + sums
    return trees.rebuild(first, grads), loss_sum, (targets != IGNORE_INDEX).sum(), small


def apply_gradients(state: TrainState, grads: Params, loss_sum: Tensor, tokens: Tensor, small: Tensor | None = None,
                    *, optimizer: optim.GradientTransformation, reduction: str = "mean", inplace: bool = False,
                    ema_debias: bool = True, divided: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
    """Normalise summed gradients (per target token for 'mean'), take one optimizer step, and update the
    moving average if the state keeps one. With small (summed noise.small_batch_sums), metrics gain the
    noise-scale estimates gns_g2 = |G|^2 and gns_trace = tr(Sigma), per target token. divided says grads are
    already per target token (loss_and_grads(..., divisor=tokens), as train_step computes them).

    inplace: the optimizer, parameters and EMA update their own tensors (the old state is donated, see
    optim.step_inplace), and grads are donated too: the fused kernel may scale them in place (clipping).
    Adam and AdamW run torch's fused kernel, eager or compiled (whose values equal the pure step's to
    rounding); any other optimizer eagerly runs its blocks in place (bit for bit), and compiled computes a
    new state and copies it into the old one, which inductor fuses into in-place writes."""
    count = tokens.clamp(min=1)
    if reduction == "mean" and not divided:
        leaves = trees.leaves(grads)
        grads = trees.rebuild(grads, optim.foreach("div", leaves, [count.to(g.dtype) for g in leaves]))
    grad_norm = optim.global_norm(grads)  # before the step: a fused kernel may overwrite grads
    # Three ways to the new state:
    #   pure (inplace=False): new tensors throughout.
    #   donated (eager, or compiled where torch's fused kernel takes the optimizer): the optimizer and the
    #     EMA write into the state's own tensors.
    #   inplace but not donated (compiled, any other optimizer): computed pure, then copied into the state's
    #     tensors (assign_), which inductor turns into in-place writes.
    donated = inplace and (not torch.compiler.is_compiling() or optim.fuses(optimizer, grads, state.params))
    if donated:
        params, opt_state = state.params, optim.step_inplace(optimizer, grads, state.opt_state, state.params)
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates)
    step, ema, has_ema = state.step + 1, state.ema, len(trees.leaves(state.ema)) > 0
    if has_ema:
        ema = moving_average.update(ema, params, state.ema_decay, step, ema_debias, inplace=donated)
    if inplace and not donated:
        params = optim.assign_(state.params, params)
        opt_state = optim.assign_(state.opt_state, opt_state)
        ema = optim.assign_(state.ema, ema) if has_ema else ema
    metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "tokens": tokens}
    if small is not None:
        mean_norm = metrics["grad_norm"].double() / (1 if reduction == "mean" else count.double())
        metrics["gns_g2"], metrics["gns_trace"] = noise.moments(small, mean_norm.square(), count)
    return trees.replace(state, params=params, opt_state=opt_state, step=step, ema=ema), metrics


def step_key(state: TrainState) -> Tensor:
    """The RNG key of the step about to be taken."""
    return fold_in(state.rng, state.step)


def train_step(state: TrainState, batch: Batch, *, config: ModelConfig, optimizer: optim.GradientTransformation,
               loss_fn: Loss = cross_entropy, reduction: str = "mean", autocast_dtype: torch.dtype | None = None,
               dropout_rate: float | Tensor = 0.0, inplace: bool = False, ema_debias: bool = True,
               log_gns: bool = False) -> tuple[TrainState, dict[str, Tensor]]:
    """One optimizer step. Metrics: loss (mean per target token), grad_norm, tokens (targets counted), and
    with log_gns (batch [A, B, T], A >= 2) gns_g2 and gns_trace (see minifn.noise).

    inplace=True donates the input state: the new parameters, optimizer state and EMA are written into its
    tensors (the pure step's values, to rounding: see apply_gradients), so the step keeps one copy of each
    tree, eager or compiled;
    the caller must not use the old state afterwards. A state with an EMA
    (init_state(..., ema=decay)) also updates it, per minifn.ema with ema_debias."""
    key = step_key(state) if isinstance(dropout_rate, Tensor) or dropout_rate else None
    # the token count is known before the backward pass: dividing the loss is free, dividing the gradients
    # is a pass over a model-sized tree
    divisor = (batch[1] != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else None
    grads, loss_sum, tokens, small = loss_and_grads(state.params, batch, key, config=config, loss_fn=loss_fn,
                                                    autocast_dtype=autocast_dtype, dropout_rate=dropout_rate,
                                                    log_gns=log_gns, divisor=divisor)
    return apply_gradients(state, grads, loss_sum, tokens, small, optimizer=optimizer, reduction=reduction,
                           inplace=inplace, ema_debias=ema_debias, divided=divisor is not None)


def eval_step(params: Params, batch: Batch, *, config: ModelConfig, loss_fn: Loss = cross_entropy,
              autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Summed loss and target count of one [B, T] batch, without gradients."""
    inputs, targets = batch
    with torch.no_grad(), _autocast(inputs.device.type, autocast_dtype):
        logits = apply(params, inputs, config)
    return {"loss_sum": loss_fn(logits, targets, reduction="sum"), "tokens": (targets != IGNORE_INDEX).sum()}


def check_batch(batch, config: ModelConfig) -> None:
    """Raise ValueError unless batch is (inputs, targets) the model can take: integer ids of one shape, [B, T]
    or [A, B, T] with T at most max_seq_len, inputs in [0, V) and targets there or IGNORE_INDEX. A compiled
    step checks none of this: an id out of range would train on nothing or abort the process. On a GPU the
    range check is asynchronous (no sync per step): a bad id fails the device's next synchronisation."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise ValueError(f"a batch is a pair (inputs, targets) of token-id tensors, got {type(batch).__name__}")
    inputs, targets = batch
    if inputs.shape != targets.shape or inputs.ndim not in (2, 3):
        raise ValueError(f"inputs and targets must have one shape, [B, T] or [A, B, T] for A micro-batches; got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    if inputs.dtype not in (torch.int64, torch.int32) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be int64 or int32, got {inputs.dtype} and {targets.dtype}")
    if inputs.shape[-1] > config.max_seq_len:
        raise ValueError(f"windows of {inputs.shape[-1]} tokens are longer than max_seq_len {config.max_seq_len}")
    v = config.vocab_size
    bad = ((inputs < 0) | (inputs >= v)).any() | (((targets < 0) | (targets >= v)) & (targets != IGNORE_INDEX)).any()
    message = f"a token id in the batch is outside the vocabulary [0, {v}) (targets may also be {IGNORE_INDEX})"
    if inputs.device.type != "cpu":
        torch._assert_async(~bad, message)
    elif bad:
        raise ValueError(message)


def check_inputs(params: Params, batch, config: ModelConfig, log_gns: bool = False, stacked: bool = False) -> None:
    """check_params (names and shapes) and check_batch: what the steps' factories run before every call, outside
    any compiled code, so a user's mistake is a clear error rather than a failed trace or a silent wrong step.
    stacked: params are a sweep's, [K, ...] per leaf. log_gns (in one process: data-parallel ranks add
    micro-batches) also needs two or more micro-batches, without which every estimate is NaN."""
    check_params(params, config, shapes=True, stacked=stacked)
    check_batch(batch, config)
    if log_gns and (batch[0].ndim == 2 or batch[0].shape[0] < 2):
        raise ValueError("log_gns compares micro-batch gradients with their sum: it needs a batch [A, B, T] of "
                         f"A >= 2 micro-batches, got {tuple(batch[0].shape)}")


def check_step_settings(reduction: str, dropout_rate) -> None:
    """Raise ValueError for a reduction or dropout rate the step would silently misread."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(dropout_rate, Tensor) and not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")


def make_train_step(config: ModelConfig, optimizer: optim.GradientTransformation, loss_fn: Loss = cross_entropy,
                    *, reduction: str = "mean", autocast_dtype: torch.dtype | None = None, dropout_rate: float = 0.0,
                    inplace: bool = False, ema_debias: bool = True, log_gns: bool = False, compile: str = "auto",
                    device: torch.device | str = "cpu", all_reduce: Callable[[list[Tensor]], None] | None = None,
                    rank: int = 0):
    """train_step bound to a config, optimizer and loss, compiled per `compile`: step(state, batch).

    Args:
      config: the model's shape.
      optimizer: a GradientTransformation (its hyperparameters live in the state, not here).
      loss_fn: loss(logits, targets, reduction) over [B, T, V] logits; targets equal to IGNORE_INDEX are skipped.
      reduction: 'mean' divides the summed gradients by the number of target tokens, 'sum' does not.
      autocast_dtype: run the forward pass under autocast to this dtype (None: no autocast region at all).
      dropout_rate: dropout on the embedding and residual branches, keyed by the state's RNG key and step.
      inplace: write the new state into the input tensors (one copy of the trees; Adam and AdamW run torch's
        fused kernel, eager or compiled).
      ema_debias: how a state with an EMA (init_state(..., ema=decay)) averages: see minifn.ema.
      log_gns: add the gradient-noise-scale estimates gns_g2 and gns_trace to the metrics (minifn.noise);
        the micro-batches (on every rank) are the small batches, so it needs two or more in all.
      compile: 'auto', 'on' or 'off' (see minifn.compiling).
      device: where the state lives; decides whether compiling is possible.
      all_reduce: data parallel only: sums a list of tensors across ranks in place. The step is then two
        compiled halves with the collective between them, outside the compiled graphs.
      rank: data parallel only: folded into the step's key, so ranks draw different dropout masks."""
    skeleton(config)  # build the module skeleton outside any compiled region
    check_step_settings(reduction, dropout_rate)
    device = torch.device(device)
    options = DROPOUT_OPTIONS if dropout_rate else None
    if all_reduce is None:
        step = maybe_compile(functools.partial(
            train_step, config=config, optimizer=optimizer, loss_fn=loss_fn, reduction=reduction,
            autocast_dtype=autocast_dtype, dropout_rate=dropout_rate, inplace=inplace, ema_debias=ema_debias,
            log_gns=log_gns), compile, device, options)

        def checked_step(state: TrainState, batch: Batch):
            check_inputs(state.params, batch, config, log_gns)
            return step(state, batch)

        return checked_step
    grads_fn = maybe_compile(functools.partial(loss_and_grads, config=config, loss_fn=loss_fn,
                                               autocast_dtype=autocast_dtype, dropout_rate=dropout_rate,
                                               log_gns=log_gns), compile, device, options)
    apply_fn = maybe_compile(functools.partial(apply_gradients, optimizer=optimizer, reduction=reduction,
                                               inplace=inplace, ema_debias=ema_debias), compile, device)

    def data_parallel_step(state: TrainState, batch: Batch):
        check_inputs(state.params, batch, config)
        key = fold_in(step_key(state), rank) if dropout_rate else None
        grads, loss_sum, tokens, small = grads_fn(state.params, batch, key)
        all_reduce([*optree.tree_leaves(grads), loss_sum, tokens, *([] if small is None else [small])])
        return apply_fn(state, grads, loss_sum, tokens, small)

    return data_parallel_step


def make_eval_step(config: ModelConfig, loss_fn: Loss = cross_entropy, *, autocast_dtype=None,
                   compile: str = "auto", device: torch.device | str = "cpu"):
    """eval_step bound to a config and loss, compiled per `compile`: step(params, batch) -> sums."""
    skeleton(config)
    step = maybe_compile(functools.partial(eval_step, config=config, loss_fn=loss_fn, autocast_dtype=autocast_dtype),
                         compile, torch.device(device))

    def checked_step(params: Params, batch: Batch):
        check_inputs(params, batch, config)
        return step(params, batch)

    return checked_step
