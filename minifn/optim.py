"""Stateless optimizers in the optax shape: `init(params) -> state`, `update(grads, state, params) ->
(updates, state)`, composed with `chain` and applied with `apply_updates`.

Every hyperparameter and step counter lives in the state as a 0-D tensor (float64 for values, int64
for counts, on the parameters' device), so a new learning rate or a new step is new data, not a new
graph for `torch.compile`. Change one with `set_hyperparams(state, lr=...)`. The aliases `sgd`, `adam`
and `adamw` reproduce `torch.optim`'s arithmetic and defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

Tree = Any
Schedule = Callable[[Tensor, Tensor], Tensor]  # (step, base_lr) -> lr, see minifn.schedules


class GradientTransformation(NamedTuple):
    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]


def _device(params: Tree) -> torch.device:
    leaves = optree.tree_leaves(params)
    return leaves[0].device if leaves else torch.device("cpu")


def _value(x: float, params: Tree) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float64, device=_device(params))


def _count(params: Tree) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device(params))


def _zeros(params: Tree) -> Tree:
    return optree.tree_map(torch.zeros_like, params)


def _once(scalar: Tensor) -> Tensor:
    """The same 0-D value, computed once per step. Inductor inlines scalar math into every consumer's
    element loop (two pow() per 16 floats of Adam); a reduction over [x, 0] is a buffer it must compute
    first, which makes the compiled Adam update about twice as fast."""
    return torch.stack([scalar, torch.zeros_like(scalar)]).sum(0)


def _as(scalar: Tensor, like: Tensor) -> Tensor:
    """A float64 0-D hyperparameter in the leaf's dtype: per-step scalars are computed in float64 (as
    torch.optim does in Python), elementwise math in the parameter dtype, which keeps kernels vectorised."""
    return scalar.to(like.dtype)


# ---------------------------------------------------------------------------------------- blocks


class ScaleByAdamState(NamedTuple):
    count: Tensor
    mu: Tree
    nu: Tree
    nu_max: Tree  # running max of nu with amsgrad, else () (no leaves for optree or torch's pytree)
    b1: Tensor
    b2: Tensor
    eps: Tensor


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, amsgrad=False) -> GradientTransformation:
    """Adam's direction mu_hat / (sqrt(nu_hat) + eps), with torch.optim.Adam's order of operations."""

    def init(params):
        return ScaleByAdamState(_count(params), _zeros(params), _zeros(params),
                                _zeros(params) if amsgrad else (),
                                _value(b1, params), _value(b2, params), _value(eps, params))

    def update(grads, state, params=None):
        count = state.count + 1
        bias1 = _once(1 - state.b1**count)
        bias2_sqrt = _once((1 - state.b2**count).sqrt())
        mu = optree.tree_map(lambda m, g: m.lerp(g, _as(1 - state.b1, g)), state.mu, grads)
        nu = optree.tree_map(lambda v, g: v * _as(state.b2, g) + _as(1 - state.b2, g) * g * g, state.nu, grads)
        nu_max = optree.tree_map(torch.maximum, state.nu_max, nu) if amsgrad else ()
        updates = optree.tree_map(
            lambda m, v: (m / _as(bias1, m)) / (v.sqrt() / _as(bias2_sqrt, v) + _as(state.eps, v)),
            mu, nu_max if amsgrad else nu)
        return updates, state._replace(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    count: Tensor
    trace: Tree
    momentum: Tensor
    dampening: Tensor


def trace(momentum=0.9, dampening=0.0, nesterov=False) -> GradientTransformation:
    """SGD momentum as torch.optim.SGD keeps it: the buffer starts as the first gradient."""

    def init(params):
        return TraceState(_count(params), _zeros(params), _value(momentum, params), _value(dampening, params))

    def update(grads, state, params=None):
        first = state.count == 0
        buf = optree.tree_map(
            lambda b, g: torch.where(first, g, b * _as(state.momentum, g) + _as(1 - state.dampening, g) * g),
            state.trace, grads)
        updates = optree.tree_map(lambda g, b: g + _as(state.momentum, b) * b, grads, buf) if nesterov else buf
        return updates, state._replace(count=state.count + 1, trace=buf)

    return GradientTransformation(init, update)


class WeightDecayState(NamedTuple):
    weight_decay: Tensor


def add_decayed_weights(weight_decay=0.0) -> GradientTransformation:
    """updates + weight_decay * params: L2 regularisation as torch.optim.Adam and SGD apply it."""

    def init(params):
        return WeightDecayState(_value(weight_decay, params))

    def update(grads, state, params):
        return optree.tree_map(lambda g, p: g + _as(state.weight_decay, p) * p, grads, params), state

    return GradientTransformation(init, update)


class ClipState(NamedTuple):
    max_norm: Tensor


def global_norm(tree: Tree) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in optree.tree_leaves(tree)]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""

    def init(params):
        return ClipState(_value(max_norm, params))

    def update(grads, state, params=None):
        scale = (state.max_norm / (global_norm(grads) + 1e-6)).clamp(max=1.0)
        return optree.tree_map(lambda g: g * _as(scale, g), grads), state

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    count: Tensor
    lr: Tensor
    weight_decay: Tensor


def scale_by_learning_rate(lr: float, schedule: Schedule | None = None, weight_decay: float = 0.0):
    """Multiply by -lr_t, where lr_t = schedule(step, lr) (or lr itself without a schedule).

    weight_decay > 0 adds AdamW's decoupled decay, which shrinks params by the factor (1 - lr_t * wd)
    rounded to the parameter dtype, exactly as torch.optim.AdamW does. Written as p * c - p (exact by
    Sterbenz' lemma) it stays an additive update; decay + lr as two separate steps drifts from torch."""

    def init(params):
        return ScaleByLearningRateState(_count(params), _value(lr, params), _value(weight_decay, params))

    def update(grads, state, params=None):
        lr_t = state.lr if schedule is None else _once(schedule(state.count, state.lr))
        updates = optree.tree_map(lambda g: _as(-lr_t, g) * g, grads)
        if weight_decay:
            keep = 1 - lr_t * state.weight_decay
            updates = optree.tree_map(lambda u, p: (p * _as(keep, p) - p) + u, updates, params)
        return updates, state._replace(count=state.count + 1)

    return GradientTransformation(init, update)


def current_lr(state: Tree, schedule: Schedule | None = None) -> Tensor:
    """The learning rate the next update will use, read from a chain's state (for logging)."""
    for s in _states(state):
        if isinstance(s, ScaleByLearningRateState):
            return s.lr if schedule is None else schedule(s.count, s.lr)
    raise ValueError("this optimizer state has no learning rate")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------- aliases


def sgd(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, schedule=None):
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        parts.append(trace(momentum, dampening, nesterov))
    return chain(*parts, scale_by_learning_rate(lr, schedule))


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, schedule=None):
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*parts, scale_by_adam(*betas, eps, amsgrad), scale_by_learning_rate(lr, schedule))


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, schedule=None):
    return chain(scale_by_adam(*betas, eps, amsgrad), scale_by_learning_rate(lr, schedule, weight_decay))


# ------------------------------------------------------------------------------------ utilities


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """params + updates, leaf by leaf, in each parameter's dtype."""
    return optree.tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


@torch.no_grad()
def assign_(target: Tree, source: Tree) -> Tree:
    """Copy source's leaves into target's tensors (the in-place path; values are bit-identical)."""
    torch._foreach_copy_(optree.tree_leaves(target), optree.tree_leaves(source))
    return target


def _states(state: Tree):
    """Every optimizer NamedTuple state inside a (possibly nested) chain state."""
    if hasattr(state, "_fields"):
        yield state
    elif isinstance(state, tuple):
        for s in state:
            yield from _states(s)


def set_hyperparams(state: Tree, **values: float) -> Tree:
    """A copy of state with named hyperparameters (lr, b1, weight_decay, ...) replaced everywhere they
    occur; the new values are tensors of the same dtype and device, so compiled steps do not retrace."""
    unknown = set(values) - {f for s in _states(state) for f in s._fields}
    if unknown:
        raise ValueError(f"no hyperparameter named {', '.join(sorted(unknown))} in this optimizer state")

    def replace(s):
        if hasattr(s, "_fields"):
            return s._replace(**{k: torch.full_like(getattr(s, k), v) for k, v in values.items() if k in s._fields})
        return tuple(replace(x) for x in s) if isinstance(s, tuple) else s

    return replace(state)
