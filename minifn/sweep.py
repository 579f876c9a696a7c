"""A hyperparameter sweep in one step: K runs as one stacked state under torch.func.vmap.

    tx = optim.adamw(lr=1e-3, weight_decay=0.1)      # the structure; each member's values come from its state
    states = sweep_states(init_params(config, 0), tx, [{"lr": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3)])
    step = make_sweep_step(config, tx, compile="auto")
    states, metrics = step(states, batch)            # metrics["loss"]: [K]; metrics["frozen"]: [K] bool
    runs = unstack_trees(states)                     # K ordinary TrainStates

Members share the architecture and the batches (each batch is read once: vmap's in_dims=None, not K
copies) and differ in their state: parameters, optimizer hyperparameters (0-D tensors, set per member),
RNG key, EMA decay, and optionally the dropout rate. A member whose loss or gradient norm is non-finite
(minifn train stops on a non-finite loss) is frozen at its state before that step: its whole state, step
count included, stops changing while the others go on, so its step count stays behind theirs (which is how
later steps know it is frozen, and its checkpoint says where it stopped). A frozen member is still computed,
and its results dropped; if every member fails at the same step, none is behind, and the next step tries
them all again.
"""

from __future__ import annotations

import contextlib
import functools

import optree
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from minifn import optim
from minifn.compiling import DROPOUT_OPTIONS, maybe_compile
from minifn.config import ModelConfig
from minifn.losses import Loss, cross_entropy
from minifn.model import Params, skeleton
from minifn.step import Batch, TrainState, check_inputs, check_step_settings, init_state, train_step
from minifn.trees import stack_trees


def sweep_states(params: Params | list[Params], optimizer: optim.GradientTransformation, hyperparams: list[dict],
                 *, seeds: int | list[int] = 0, ema: float | list[float] = 0.0) -> TrainState:
    """K = len(hyperparams) fresh TrainStates stacked on a new dimension 0 (every leaf [K, ...]).

    Args:
      params: every member's initial parameters, or a list of K trees (e.g. one per seed).
      optimizer: the GradientTransformation all members share (its structure: SGD momentum, for one, must
        be built in to be set).
      hyperparams: per member, the {name: value} optim.set_hyperparams sets (lr, weight_decay, b1, b2, eps,
        max_norm, warmup_steps, momentum, dampening).
      seeds: the RNG seed (dropout) of each member, or one for all.
      ema: the EMA decay of each member, or one for all (0: no EMA; all members or none)."""
    k = len(hyperparams)
    trees = params if isinstance(params, list) else [params] * k
    seeds = seeds if isinstance(seeds, list) else [seeds] * k
    decays = ema if isinstance(ema, list) else [ema] * k
    if not (len(trees) == len(seeds) == len(decays) == k) or k == 0:
        raise ValueError(f"a sweep needs one entry per member: {k} hyperparameter sets, {len(trees)} parameter "
                         f"trees, {len(seeds)} seeds, {len(decays)} EMA decays")
    if any(decays) and not all(decays):
        raise ValueError("EMA must be on for every member of a sweep or for none (the states share one shape)")
    members = []
    for tree, seed, decay, values in zip(trees, seeds, decays, hyperparams):
        state = init_state(tree, optimizer, seed=seed, ema=decay)
        members.append(state._replace(opt_state=optim.set_hyperparams(state.opt_state, **values)))
    return stack_trees(members)


def freeze_diverged(old: TrainState, new: TrainState, metrics: dict[str, Tensor]) -> tuple[TrainState, Tensor]:
    """(new state, with every member kept at its old state that is behind the others' step count (it froze
    earlier) or whose loss or gradient norm is non-finite; the [K] bool frozen flags).

    The flags come from the loss and the gradient norm, which are known before the update, so the choice
    fuses into the update's own pass. Checking the new parameters too would cost a second pass over the
    whole state after the update (about 10% of a tiny sweep's step, measured ad hoc: see the README), for
    a case finite gradients reach only at absurd learning rates (lr * grad overflowing float32); there the
    next step's loss is non-finite, and the member freezes one step later, holding the overflowed weights."""
    ok = torch.isfinite(metrics["loss"]) & torch.isfinite(metrics["grad_norm"]) & (old.step == old.step.max())
    keep = lambda n, o: torch.where(ok.view(-1, *[1] * (n.ndim - 1)), n, o)  # noqa: E731
    return optree.tree_map(keep, new, old), ~ok


# Attention weights the math form may keep for the backward pass, all members and layers together.
MATH_ATTENTION_MAX_BYTES = 2**28


def math_attention_pays(states: TrainState, batch: Batch, config: ModelConfig) -> bool:
    """Whether a sweep should run attention in SDPA's math form (matmuls and a softmax, which vmap batches):
    on the CPU when its attention weights are small. functorch has no batching rule for the CPU flash kernel,
    so under vmap it runs once per member, with a slice and a copy each (benchmarks/RESULTS.md, "Sweep")."""
    inputs = batch[0]
    members, tokens = states.step.shape[0], inputs.shape[-1]
    weights = members * inputs[..., 0].numel() * config.num_heads * tokens**2 * config.num_layers * 4
    return inputs.device.type == "cpu" and weights <= MATH_ATTENTION_MAX_BYTES


def sweep_step(states: TrainState, batch: Batch, dropout_rates: Tensor | None = None, *,
               math_attention: bool | None = None, inplace: bool = False, **step_kwargs):
    """train_step for every member of states (stacked) on one shared batch; metrics are [K], plus frozen.
    math_attention: SDPA's math form or its own choice of kernel (None: math_attention_pays decides).
    inplace: write the new states into states' tensors (compiled, the last kernels write them there, so
    the step keeps one copy of the stacked states; eagerly it is one more pass, a copy)."""
    if math_attention is None:
        math_attention = math_attention_pays(states, batch, step_kwargs["config"])
    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        new, metrics = _sweep_step(states, batch, dropout_rates, **step_kwargs)
    if inplace:
        new = optim.assign_(states, new)
    return new, metrics


def _sweep_step(states: TrainState, batch: Batch, dropout_rates: Tensor | None, **step_kwargs):
    if dropout_rates is None:
        member = functools.partial(train_step, **step_kwargs)
        new, metrics = torch.func.vmap(member, in_dims=(0, None))(states, batch)
    else:
        member = lambda s, b, rate: train_step(s, b, dropout_rate=rate, **step_kwargs)  # noqa: E731
        new, metrics = torch.func.vmap(member, in_dims=(0, None, 0))(states, batch, dropout_rates)
    new, frozen = freeze_diverged(states, new, metrics)
    return new, {**metrics, "frozen": frozen}


def make_sweep_step(config: ModelConfig, optimizer: optim.GradientTransformation, loss_fn: Loss = cross_entropy,
                    *, reduction: str = "mean", autocast_dtype: torch.dtype | None = None,
                    dropout_rates: list[float] | None = None, ema_debias: bool = True, log_gns: bool = False,
                    math_attention: bool | None = None, inplace: bool = False, compile: str = "auto",
                    device: torch.device | str = "cpu"):
    """sweep_step bound to a config, optimizer and loss, compiled per `compile`: step(states, batch).

    Args:
      config: the model's shape (shared by all members).
      optimizer: the GradientTransformation the states were built with (sweep_states).
      loss_fn: as make_train_step.
      reduction: as make_train_step.
      autocast_dtype: as make_train_step.
      dropout_rates: one dropout rate per member (None: no dropout); each member's own RNG key draws its masks.
      ema_debias: as make_train_step, for states with an EMA.
      log_gns: as make_train_step (per-member noise-scale metrics).
      math_attention: as sweep_step (None: math_attention_pays decides).
      inplace: as sweep_step: the caller must not use the old states afterwards (minifn sweep passes True).
      compile: 'auto', 'on' or 'off' (see minifn.compiling).
      device: where the states live; decides whether compiling is possible."""
    skeleton(config)
    for rate in [0.0, *(dropout_rates or [])]:  # the reduction once, then each member's rate, as make_train_step
        check_step_settings(reduction, rate)
    device = torch.device(device)
    rates = None
    if dropout_rates is not None and any(dropout_rates):
        rates = torch.tensor(dropout_rates, dtype=torch.float64, device=device)  # [K]: per member, as data
    step = functools.partial(sweep_step, config=config, optimizer=optimizer, loss_fn=loss_fn, reduction=reduction,
                             autocast_dtype=autocast_dtype, ema_debias=ema_debias, log_gns=log_gns,
                             math_attention=math_attention, inplace=inplace)
    compiled = maybe_compile(step, compile, device, None if rates is None else DROPOUT_OPTIONS)

    def checked_step(states: TrainState, batch: Batch):
        check_inputs(states.params, batch, config, log_gns, stacked=True)
        if rates is not None and rates.shape[0] != states.step.shape[0]:
            raise ValueError(f"{rates.shape[0]} dropout rates for a sweep of {states.step.shape[0]} members: "
                             "give one per member")
        return compiled(states, batch) if rates is None else compiled(states, batch, rates)

    return checked_step
