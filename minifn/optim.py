"""Stateless optimizers in the optax shape: `init(params) -> state`, `update(grads, state, params) ->
(updates, state)`, composed with `chain` and applied with `apply_updates`.

Every hyperparameter and step counter lives in the state as a 0-D tensor (float64 for values, int64
for counts, on the parameters' device), so a new learning rate or a new step is new data, not a new
graph for `torch.compile`. Change one with `set_hyperparams(state, lr=...)`. The aliases `sgd`, `adam`
and `adamw` reproduce `torch.optim`'s arithmetic and defaults.

The blocks work on flat lists of leaves with `torch._foreach_*` ops. Inputs are never modified (but see
the donating forms below): each block allocates its outputs and finishes them in place, because on CPU a
new model-sized list costs up to ten times an in-place pass (page faults), and each one alive is another
copy of the model in memory.
The one exception is asked for: `update(..., inplace=True)` lets a block overwrite its own state's
buffers (the caller donates the old state, as `jax.jit(donate_argnums=...)` does), which an eager train
step uses to keep one copy of the moments instead of two. The values are the same, bit for bit.

A donating caller goes further with `step_inplace`: the `adam` and `adamw` aliases carry a `fused_step`
that does the whole step in torch's fused Adam kernel (one pass over each leaf instead of a dozen), as
`torch.optim.AdamW(fused=True)` does and with its values bit for bit; they equal the composed blocks' to
rounding. The kernel is wrapped as a custom op, so a compiled step calls it too, rather than having
inductor generate and build its own (a third of a cold compile). Clipping before it is folded into the
kernel's gradient scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from minifn import trees

Tree = Any
Schedule = Callable[[Tensor, Tensor], Tensor]  # (step, base_lr) -> lr, see minifn.schedules


class GradientTransformation(NamedTuple):
    init: Callable[[Tree], Tree]
    update: Callable[..., tuple[Tree, Tree]]  # (grads, state, params, *, inplace=False) -> (updates, state)
    # (grads, state, params, grad_scale=None) -> state: the same step (on grads / grad_scale) in one fused
    # kernel that writes params and the state's buffers in place (see step_inplace); None if there is none
    fused_step: Callable[..., Tree] | None = None
    # (grads, state) -> 0-D factor, for a transform whose update multiplies every gradient by it (clipping):
    # a chain before a fused step applies the factor inside the kernel instead of in a pass of its own
    scale: Callable[[Tree, Tree], Tensor] | None = None


def run_update(transform: GradientTransformation, grads: Tree, state: Tree, params: Tree = None, *,
               inplace: bool = False) -> tuple[Tree, Tree]:
    """transform.update, passing inplace=True only when asked: a transform written without the keyword
    still works wherever the state is not donated."""
    if inplace:
        return transform.update(grads, state, params, inplace=True)
    return transform.update(grads, state, params)


def fuses(transform: GradientTransformation, grads: Tree, params: Tree) -> bool:
    """Whether step_inplace takes transform's fused kernel for these leaves: plain tensors (not under vmap or
    grad, not differentiated through) on a device with the kernel; eager or compiled."""
    return transform.fused_step is not None and _fusable(trees.leaves(grads), trees.leaves(params))


def step_inplace(transform: GradientTransformation, grads: Tree, state: Tree, params: Tree) -> Tree:
    """One step that overwrites params and the state's buffers (both donated); returns the new state.
    The transform's fused kernel runs where it has one and the leaves allow it (see fuses), else
    update(..., inplace=True) and apply_updates in place. The fused kernel may overwrite grads."""
    if fuses(transform, grads, params):
        return transform.fused_step(grads, state, params)
    updates, state = run_update(transform, grads, state, params, inplace=True)
    apply_updates(params, updates, inplace=True)
    return state


def _own(op: str, inplace: bool) -> str:
    """op, or its in-place form when the block may overwrite its own state (inplace=True)."""
    return f"{op}_" if inplace else op


def _device(params: Tree) -> torch.device:
    leaves = optree.tree_leaves(params)
    return leaves[0].device if leaves else torch.device("cpu")


def _value(x: float, params: Tree) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float64, device=_device(params))


def _count(params: Tree) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device(params))


def _zeros(params: Tree) -> Tree:
    return optree.tree_map(torch.zeros_like, params)


def _present(field) -> bool:
    """Whether an optional state field was built (an absent one is ())."""
    return not (type(field) is tuple and len(field) == 0)


_MADE_BY_ANOTHER = "step a state with the update of the optimizer whose init made it"


def _kind(kind: type, fields: list[tuple[str, bool]]) -> str:
    """A state kind and its optional fields, e.g. 'ScaleByAdamState (nu_max absent)'."""
    if not fields:
        return kind.__name__
    return f"{kind.__name__} ({', '.join(f'{f} built' if b else f'{f} absent' for f, b in fields)})"


def _expect(state, kind: type, **built: bool) -> None:
    """Refuse a state that another optimizer's init made: a kind other than this block's, or one whose
    optional fields (name=whether this block was built with it) differ, which would otherwise fail deep
    in the update with an error that names neither optimizer."""
    if isinstance(state, kind) and all(_present(getattr(state, f)) == want for f, want in built.items()):
        return
    got = [(f, _present(getattr(state, f))) for f in built] if isinstance(state, kind) else []
    raise TypeError(f"this update takes a {_kind(kind, list(built.items()))}, got a {_kind(type(state), got)}: "
                    f"{_MADE_BY_ANOTHER}")


def _expect_chain(state, n: int) -> None:
    """Refuse a chain state that is not a plain tuple of n states (a NamedTuple is one block's state)."""
    plain = isinstance(state, tuple) and not hasattr(state, "_fields")
    if plain and len(state) == n:
        return
    got = f"a tuple of {len(state)}" if plain else f"a {type(state).__name__}"
    raise TypeError(f"this chain of {n} takes a tuple of {n} states, got {got}: {_MADE_BY_ANOTHER}")


def _need_params(params, block: str) -> None:
    """Refuse params=None in a block that reads the parameters (weight decay), which would otherwise fail in
    tree code with an error about leaf counts."""
    if params is None:
        raise TypeError(f"{block} reads the parameters: call update(grads, state, params), not update(grads, state)")


def _once(scalar: Tensor) -> Tensor:
    """The same 0-D value, computed once per step. Inductor inlines scalar math into every consumer's
    element loop (two pow() per 16 floats of Adam); a reduction over [x, 0] is a buffer it must compute
    first, which makes the compiled Adam update about twice as fast."""
    return torch.stack([scalar, torch.zeros_like(scalar)]).sum(0)


def _as(scalar: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """A float64 0-D hyperparameter in each leaf's dtype, one per leaf: per-step scalars are computed in
    float64 (as torch.optim does in Python), elementwise math in the parameter dtype, which keeps kernels
    vectorised (and a 0-D leaf's dtype from being promoted)."""
    cast = {dtype: scalar.to(dtype) for dtype in {x.dtype for x in leaves}}
    return [cast[x.dtype] for x in leaves]


def _wrapped(*lists: list[Tensor]) -> bool:
    """Whether any list holds tensors of a torch.func transform (vmap, grad), for which there are no foreach
    kernels and no out= arguments. Compiled, only vmap's remain (dynamo traces is_batchedtensor, not the
    wider test)."""
    wrapped = is_batchedtensor if torch.compiler.is_compiling() else is_functorch_wrapped_tensor
    return any(wrapped(x) for xs in lists for x in xs)


def foreach(op: str, *lists: list[Tensor]) -> list[Tensor]:
    """torch._foreach_<op>(*lists) over lists of leaves; use the result, as an in-place op may be out of
    place. Inside torch.func transforms (vmap has no batching rules for foreach ops, nor for addcmul_)
    the out-of-place op runs leaf by leaf; dynamo can trace is_batchedtensor but not the wider test."""
    if not lists[0]:
        return []
    if not _wrapped(*lists):
        out = getattr(torch, f"_foreach_{op}")(*lists)
        return lists[0] if op.endswith("_") else list(out)
    return [getattr(Tensor, op.rstrip("_"))(*xs) for xs in zip(*lists)]


# Compiled, inductor fuses each leaf's chain of foreach ops into one loop, except _foreach_lerp and
# _foreach_norm, which stay eager calls outside it, and _foreach_add of one 0-D tensor, which syncs:
# hence _lerp, global_norm leaf by leaf, and scalars as lists.


def _lerp(start: list[Tensor], end: list[Tensor], weight: list[Tensor], inplace: bool = False) -> list[Tensor]:
    """start + (end - start) * weight, in a new list (or in start with inplace): one _foreach_lerp eagerly,
    three fusable ops compiled."""
    if torch.compiler.is_compiling() and not inplace:
        return foreach("add_", foreach("mul_", foreach("sub", end, start), weight), start)
    return foreach(_own("lerp", inplace), start, end, weight)


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
    """Adam's direction mu_hat / (sqrt(nu_hat) + eps), as torch.optim.Adam computes it (to rounding)."""

    def init(params):
        return ScaleByAdamState(_count(params), _zeros(params), _zeros(params),
                                _zeros(params) if amsgrad else (),
                                _value(b1, params), _value(b2, params), _value(eps, params))

    def update(grads, state, params=None, *, inplace=False):
        _expect(state, ScaleByAdamState, nu_max=amsgrad)
        g = trees.leaves(grads)
        count = state.count + 1
        bias1 = 1 - state.b1**count
        scale, floor = _once(bias1 / (1 - state.b2**count).sqrt()), _once(bias1 * state.eps)
        mu = _lerp(trees.leaves(state.mu), g, _as(1 - state.b1, g), inplace)
        scaled = foreach("mul", g, _as(1 - state.b2, g))
        nu = foreach("addcmul_", foreach(_own("mul", inplace), trees.leaves(state.nu), _as(state.b2, g)), g,
                     scaled)  # v * b2 + g * (g * (1 - b2)), as torch.optim
        nu_max = foreach(_own("maximum", inplace), trees.leaves(state.nu_max), nu) if amsgrad else nu
        # mu_hat / (sqrt(nu_hat) + eps) = mu / (sqrt(nu) * scale + floor); with inplace, eagerly, written
        # into the scaled gradients' buffers (one model-sized allocation fewer per step, torch has no
        # _foreach op with out=)
        reuse = inplace and not torch.compiler.is_compiling() and not _wrapped(nu_max, scaled)
        root = [torch.sqrt(x, out=y) for x, y in zip(nu_max, scaled)] if reuse else foreach("sqrt", nu_max)
        d = foreach("add_", foreach("mul_", root, _as(scale, g)), _as(floor, g))
        d = foreach("mul_", foreach("reciprocal_", d), mu)
        new = functools.partial(trees.rebuild, grads)
        return new(d), trees.replace(state, count=count, mu=new(mu), nu=new(nu), nu_max=new(nu_max) if amsgrad else ())

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

    def update(grads, state, params=None, *, inplace=False):
        _expect(state, TraceState)
        g = trees.leaves(grads)
        first = state.count == 0  # then buf * 0 + g * 1, which is exactly g
        keep, damp = torch.where(first, 0.0, state.momentum), torch.where(first, 1.0, 1 - state.dampening)
        buf = foreach("addcmul_", foreach(_own("mul", inplace), trees.leaves(state.trace), _as(keep, g)), g,
                      _as(damp, g))
        updates = foreach("add_", foreach("mul", buf, _as(state.momentum, g)), g) if nesterov else buf
        new = functools.partial(trees.rebuild, grads)
        return new(updates), trees.replace(state, count=state.count + 1, trace=new(buf))

    return GradientTransformation(init, update)


class WeightDecayState(NamedTuple):
    weight_decay: Tensor


def add_decayed_weights(weight_decay=0.0) -> GradientTransformation:
    """updates + weight_decay * params: L2 regularisation as torch.optim.Adam and SGD apply it."""

    def init(params):
        return WeightDecayState(_value(weight_decay, params))

    def update(grads, state, params, *, inplace=False):
        _expect(state, WeightDecayState)
        _need_params(params, "weight decay (add_decayed_weights, in sgd and adam)")
        g, p = trees.leaves(grads), trees.leaves(params)
        return trees.rebuild(grads, foreach("add_", foreach("mul", p, _as(state.weight_decay, p)), g)), state

    return GradientTransformation(init, update)


class ClipState(NamedTuple):
    max_norm: Tensor


def global_norm(tree: Tree) -> Tensor:
    """The 2-norm of all leaves together."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in trees.leaves(tree)]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""

    def init(params):
        return ClipState(_value(max_norm, params))

    def scale(grads, state):
        return (state.max_norm / (global_norm(grads) + 1e-6)).clamp(max=1.0)

    def update(grads, state, params=None, *, inplace=False):
        _expect(state, ClipState)
        g = trees.leaves(grads)
        return trees.rebuild(grads, foreach("mul", g, _as(scale(g, state), g))), state

    return GradientTransformation(init, update, scale=scale)


class ScaleByLearningRateState(NamedTuple):
    count: Tensor
    lr: Tensor
    weight_decay: Tensor | tuple  # () without decoupled decay
    warmup_steps: Tensor | tuple = ()  # 0-D int64 length of the linear warm-up, or () when built without one


def _scheduled_lr(state: ScaleByLearningRateState, schedule: Schedule | None) -> Tensor:
    """The learning rate of step state.count: the schedule's, after a linear warm-up if the state has one.
    The warm-up ramps from lr / W to lr over the first W steps, then the schedule starts from its step 0
    (schedules.warmup's shape, with W as data so that a sweep can vary it and a resume can change it)."""
    schedule = schedule or (lambda step, lr: lr)
    if isinstance(state.warmup_steps, tuple):
        return schedule(state.count, state.lr)
    warmup = state.warmup_steps
    ramp = state.lr * (state.count + 1).to(state.lr.dtype) / warmup.clamp(min=1).to(state.lr.dtype)
    return torch.where(state.count < warmup, ramp, schedule((state.count - warmup).clamp(min=0), state.lr))


def scale_by_learning_rate(lr: float, schedule: Schedule | None = None, weight_decay: float | None = None,
                           warmup_steps: int | None = None):
    """Multiply by -lr_t, where lr_t = schedule(step, lr) (or lr itself without a schedule).

    A weight_decay (0 included, so that it can be set later) adds AdamW's decoupled decay, which shrinks
    params by the factor (1 - lr_t * wd) rounded to the parameter dtype, exactly as torch.optim.AdamW does.
    Written as p * c - p (exact by Sterbenz' lemma) it stays an additive update; decay + lr as two separate
    steps drifts from torch. A warmup_steps (0 included) puts a linear warm-up before the schedule, its
    length kept in the state like any hyperparameter."""

    def init(params):
        decay = () if weight_decay is None else _value(weight_decay, params)
        warmup = () if warmup_steps is None else _count(params) + int(warmup_steps)
        return ScaleByLearningRateState(_count(params), _value(lr, params), decay, warmup)

    def update(grads, state, params=None, *, inplace=False):
        _expect(state, ScaleByLearningRateState, weight_decay=weight_decay is not None)  # warm-up: read from the state
        g = trees.leaves(grads)
        constant = schedule is None and isinstance(state.warmup_steps, tuple)
        lr_t = state.lr if constant else _once(_scheduled_lr(state, schedule))
        if weight_decay is not None:
            _need_params(params, "decoupled weight decay (adamw)")
            p = trees.leaves(params)
            decay = foreach("sub_", foreach("mul", p, _as(1 - lr_t * state.weight_decay, p)), p)
            updates = foreach("addcmul_", decay, g, _as(-lr_t, g))
        else:
            updates = foreach("mul", g, _as(-lr_t, g))
        return trees.rebuild(grads, updates), trees.replace(state, count=state.count + 1)

    return GradientTransformation(init, update)


def current_lr(state: Tree, schedule: Schedule | None = None) -> Tensor:
    """The learning rate the next update will use, read from a chain's state (for logging)."""
    for s in _states(state):
        if isinstance(s, ScaleByLearningRateState):
            return _scheduled_lr(s, schedule)
    raise ValueError("this optimizer state has no learning rate")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order; the state is the tuple of their states. The chain has a fused_step when
    its last transform does (e.g. clipping before adamw): the others update, the last one fuses; when the
    one other only scales (clipping), its factor goes into the fused kernel and no pass of its own runs."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None, *, inplace=False):
        _expect_chain(state, len(transforms))
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = run_update(t, grads, s, params, inplace=inplace)
            new_state.append(s)
        return grads, tuple(new_state)

    def fused_step(grads, state, params, grad_scale=None):
        *head, last = transforms
        if grad_scale is None and len(head) == 1 and head[0].scale is not None:  # grads * factor
            return (state[0], last.fused_step(grads, state[-1], params, 1 / head[0].scale(grads, state[0])))
        grads, new_state = chain(*head).update(grads, state[:-1], params, inplace=True)
        return (*new_state, last.fused_step(grads, state[-1], params, grad_scale))

    return GradientTransformation(init, update, fused_step if transforms and transforms[-1].fused_step else None)


# --------------------------------------------------------------------------------------- aliases


# The aliases carry every hyperparameter they take, weight decay included at 0, so set_hyperparams can set
# any of them later (a resumed run with a new --weight-decay). SGD's momentum buffer is the exception: it
# exists only with momentum > 0, and so is the warm-up, which exists only when warmup_steps is given (0
# included): a schedule closure cannot be swept or changed, a warm-up length in the state can.


def sgd(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, schedule=None, warmup_steps=None):
    momentum_part = [trace(momentum, dampening, nesterov)] if momentum else []
    return chain(add_decayed_weights(weight_decay), *momentum_part,
                 scale_by_learning_rate(lr, schedule, warmup_steps=warmup_steps))


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, schedule=None, warmup_steps=None):
    composed = chain(add_decayed_weights(weight_decay), scale_by_adam(*betas, eps, amsgrad),
                     scale_by_learning_rate(lr, schedule, warmup_steps=warmup_steps))
    return composed._replace(fused_step=_fused_adam(False, amsgrad, schedule))


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, schedule=None, warmup_steps=None):
    composed = chain(scale_by_adam(*betas, eps, amsgrad),
                     scale_by_learning_rate(lr, schedule, weight_decay, warmup_steps))
    return composed._replace(fused_step=_fused_adam(True, amsgrad, schedule))


# --------------------------------------------------------------------------------- fused kernels


_FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())


def _fusable(grads: list[Tensor], params: list[Tensor]) -> bool:
    """Whether torch's fused Adam kernels take these leaves: plain tensors (not under torch.func, not
    differentiated through), floating point, each gradient in its parameter's dtype, on one device that
    has the kernels."""
    return (len(params) > 0 and not _wrapped(grads, params) and params[0].device.type in _FUSED_DEVICES
            and all(p.is_floating_point() and not p.requires_grad and g.dtype == p.dtype
                    and p.device == g.device == params[0].device for p, g in zip(params, grads, strict=True)))


@torch.library.custom_op("minifn::fused_adam_", mutates_args=("params", "grads", "mu", "nu", "nu_max"))
def _fused_adam_op(params: list[Tensor], grads: list[Tensor], mu: list[Tensor], nu: list[Tensor],
                   nu_max: list[Tensor], count: Tensor, lr: Tensor, b1: Tensor, b2: Tensor, weight_decay: Tensor,
                   eps: Tensor, grad_scale: Tensor | None, decoupled: bool, amsgrad: bool) -> None:
    """torch._fused_adam(w)_ as torch.optim calls it: python-float hyperparameters (read here, so a compiled
    step passes them as data), float32 step counts, gradients divided by grad_scale (and written back so).
    An opaque op to torch.compile: its graph calls the kernel instead of generating (and compiling) its own."""
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(params, grads, mu, nu, nu_max, [count.to(torch.float32)] * len(params), lr=float(lr), beta1=float(b1),
           beta2=float(b2), weight_decay=float(weight_decay), eps=float(eps), amsgrad=amsgrad, maximize=False,
           grad_scale=None if grad_scale is None else grad_scale.to(device=params[0].device, dtype=torch.float32))


@_fused_adam_op.register_fake
def _(params, grads, mu, nu, nu_max, count, lr, b1, b2, weight_decay, eps, grad_scale, decoupled, amsgrad):
    return None


def _fused_adam(decoupled: bool, amsgrad: bool, schedule: Schedule | None):
    """fused_step for the adam (decoupled=False: chain(decay, moments, rate)) and adamw (chain(moments,
    rate)) aliases: torch's fused kernel on the state's moments and hyperparameters, with torch.optim's
    values bit for bit (without a grad_scale)."""

    def fused_step(grads, state, params, grad_scale=None):
        _expect_chain(state, 3 - decoupled)
        *l2, moments, rate = state
        _expect(moments, ScaleByAdamState, nu_max=amsgrad)
        _expect(rate, ScaleByLearningRateState, weight_decay=decoupled)
        decay = rate.weight_decay if decoupled else l2[0].weight_decay
        count = moments.count + 1
        leaves = trees.leaves
        _fused_adam_op(leaves(params), leaves(grads), leaves(moments.mu), leaves(moments.nu), leaves(moments.nu_max),
                       count, _scheduled_lr(rate, schedule), moments.b1, moments.b2, decay, moments.eps, grad_scale,
                       decoupled, amsgrad)
        return (*l2, trees.replace(moments, count=count), trees.replace(rate, count=rate.count + 1))

    return fused_step


# ------------------------------------------------------------------------------------ utilities


def apply_updates(params: Tree, updates: Tree, inplace: bool = False) -> Tree:
    """params + updates, in each parameter's dtype (written into params with inplace)."""
    p = trees.leaves(params)
    u = [u if u.dtype == x.dtype else u.to(x.dtype) for u, x in zip(trees.leaves(updates), p, strict=True)]
    return trees.rebuild(params, foreach(_own("add", inplace), p, u))


@torch.no_grad()
def assign_(target: Tree, source: Tree) -> Tree:
    """Copy source's leaves into target's tensors (the in-place path; values are bit-identical).

    One copy_ per leaf, not one _foreach_copy_: compiled (torch 2.13), inductor writes a _foreach_copy_'s
    targets one after another while later sources still read earlier targets, so a source that reads
    another leaf (a sweep's step count, say) sees its new value (tests/test_optim.py has the reproducer)."""
    for t, x in zip(trees.leaves(target), trees.leaves(source), strict=True):
        t.copy_(x)
    return target


def _states(state: Tree):
    """Every optimizer NamedTuple state inside a (possibly nested) chain state."""
    if hasattr(state, "_fields"):
        yield state
    elif isinstance(state, tuple):
        for s in state:
            yield from _states(s)


HYPERPARAMETERS = ("lr", "b1", "b2", "eps", "weight_decay", "momentum", "dampening", "max_norm", "warmup_steps")


def set_hyperparams(state: Tree, **values: float) -> Tree:
    """A copy of state with named hyperparameters (lr, b1, weight_decay, ...) replaced everywhere they
    occur; the new values are tensors of the same dtype and device, so compiled steps do not retrace.
    A name that is not a hyperparameter, or one this optimizer was built without, is an error."""
    not_hyper = sorted(set(values) - set(HYPERPARAMETERS))
    if not_hyper:
        raise ValueError(f"{', '.join(not_hyper)}: not a hyperparameter (those are {', '.join(HYPERPARAMETERS)})")
    warmup = values.get("warmup_steps", 0)
    if warmup < 0 or warmup != int(warmup):
        raise ValueError(f"warmup_steps must be a whole number of steps, got {values['warmup_steps']}")
    present = {f for s in _states(state) for f in s._fields if isinstance(getattr(s, f), Tensor)}
    missing = sorted(set(values) - present)
    if missing:
        raise ValueError(f"this optimizer was built without {', '.join(missing)}, so setting it would change "
                         "nothing; build it with that part (e.g. sgd(momentum=0.9), chain(clip_by_global_norm(...)))")

    def replace(s):
        if hasattr(s, "_fields"):
            return s._replace(**{k: torch.full_like(getattr(s, k), v) for k, v in values.items()
                                 if k in s._fields and isinstance(getattr(s, k), Tensor)})
        return tuple(replace(x) for x in s) if isinstance(s, tuple) else s

    return replace(state)
