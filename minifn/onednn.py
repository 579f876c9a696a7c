"""Linear layers whose forward product and input gradient run in oneDNN or MKL, whichever this machine runs
faster at each shape.

aten sends every float32 product on an x86 CPU to MKL; PyTorch also ships oneDNN, and which of the two is
faster depends on the shape and on the machine: on one AMD EPYC, oneDNN ran the head's x W^T (256 x 256 x
32000 at the seed shape) 1.5x faster than MKL; on another, MKL led on most of the model's products and
oneDNN's route made the bench step 7% slower (benchmarks/gemm_backends.py). So `linear` computes the
forward product y = x W^T and the input's gradient dx = dy W (the same op, with W^T as the weight: a view,
never copied) in a custom op that times both libraries at a shape's first call and keeps the faster
(`faster_in_onednn`; that call returns the faster one's last timed result). The choice is remembered in this
process and in a file in inductor's cache folder, so that a run and its resumption compute the same
numbers; MINIFN_LINEAR=onednn or =aten fixes it instead.
The weight's gradient stays in aten: oneDNN computes it fast only transposed, and the copy back costs what
it saves. Everywhere else (GPU, other dtypes, autocast, under vmap) it is F.linear, and so it is with oneDNN
switched off: `torch.backends.mkldnn.flags(enabled=False)` around the first call of a step (its trace).

Mechanics: the product is a custom op (opaque to dynamo, with a fake kernel for tracing; compiled code
calls it, so the choice is made at run time alike), wrapped in an autograd.Function whose backward computes
dx by the same Function and dW by aten. torch.func.grad and torch.compile both keep that backward:
tests/test_onednn.py checks the whole model's gradients, eager and compiled, against F.linear's.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import coerce_cinterpreter

from minifn.files import write_atomically

AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """aten's entry to oneDNN's linear (with no fused activation: "none")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


ROUTES = ("tuned", "onednn", "aten")


class RouteSettingError(ValueError):
    """MINIFN_LINEAR names no route."""


def route_setting() -> str:
    """MINIFN_LINEAR: 'tuned' (the default: measured per shape), 'onednn' or 'aten' (fixed)."""
    route = os.environ.get("MINIFN_LINEAR", "tuned")
    if route not in ROUTES:
        raise RouteSettingError(f"MINIFN_LINEAR={route!r} is not a route: choose one of {', '.join(ROUTES)}")
    return route


_TUNING_SECONDS = 0.5  # per product, past its second timing of each library
# Products of fewer multiply-adds (a decoding step's, a toy model's) take aten unmeasured: microseconds either
# way, and each new shape would cost a measurement and a write of the file.
MIN_TIMED_MACS = 1 << 23


def _route_file() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # honours TORCHINDUCTOR_CACHE_DIR

    return Path(cache_dir()) / "minifn-linear-routes.json"


def _read_routes() -> dict[str, bool]:
    try:
        return {k: bool(v) for k, v in json.loads(_route_file().read_text()).items()}
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: measure again
        return {}


@cache
def _choices() -> dict[str, bool]:
    """This process's choices (route key -> whether oneDNN is faster): the file's at first use, then each
    new measurement's."""
    return _read_routes()


def _remember(key: str, faster: bool) -> None:
    """Keep a choice, and add it to the file (read again first: another process may have added its own)."""
    _choices()[key] = faster
    try:
        write_atomically(_route_file(), json.dumps({**_read_routes(), key: faster}, indent=0, sort_keys=True).encode())
    except OSError:  # a read-only cache: this process still keeps its choice
        pass


def _best_seconds(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each call's fastest time, timed in turn (so both see the same moment of a shared machine): at least
    two rounds, three where they take under _TUNING_SECONDS."""
    best = dict.fromkeys(calls, float("inf"))
    start = time.perf_counter()
    for round_ in range(3):
        if round_ == 2 and time.perf_counter() - start > _TUNING_SECONDS:
            break
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


@cache
def _machine() -> str:
    """The CPU's model name (the choice is the machine's), or its architecture where Linux does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def faster_in_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether oneDNN computes x @ weight^T + bias faster than aten does here, per MINIFN_LINEAR: 'tuned'
    (the default) measures it at the first call for each shape, weight layout and thread count, for products
    of at least MIN_TIMED_MACS multiply-adds (smaller ones take aten)."""
    return _route(x, weight, bias)[0]


def _route(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, Tensor | None]:
    """(faster_in_onednn, and the product itself where measuring just computed it with the faster library)."""
    route = route_setting()
    if route != "tuned":
        return route == "onednn", None
    if x.numel() * weight.shape[0] < MIN_TIMED_MACS:
        return False, None
    key = (f"{torch.__version__} {_machine()} threads={torch.get_num_threads()} "
           f"x={list(x.shape)} w={list(weight.shape)}/{list(weight.stride())} bias={bias is not None}")
    if key in _choices():
        return _choices()[key], None
    last = {}  # each library's latest result: the faster one's is this call's product

    def timed(name, product):
        return lambda: last.__setitem__(name, product())

    seconds = _best_seconds({"onednn": timed("onednn", lambda: _kernel(x, weight, bias)),
                             "aten": timed("aten", lambda: F.linear(x, weight, bias))})
    faster = seconds["onednn"] < seconds["aten"]
    _remember(key, faster)
    return faster, last.get("onednn" if faster else "aten")


@torch.library.custom_op("minifn::linear", mutates_args=(), device_types="cpu")
def linear_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias by oneDNN or aten, whichever is faster here; no autograd of its own (see _Linear)."""
    x = x.contiguous()
    in_onednn, product = _route(x, weight, bias)
    if product is not None:  # a shape's first call: its measurement computed it already
        return product
    return _kernel(x, weight, bias) if in_onednn else F.linear(x, weight, bias)


@linear_product.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Linear(torch.autograd.Function):
    """F.linear's function and gradients, with y = x W^T and dx = dy W by linear_product and dW in aten."""

    @staticmethod
    def forward(x, weight, bias):
        return linear_product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        # Every gradient, always: compiled under torch.func.grad, ctx.needs_input_grad reads False for inputs
        # that need one (pytorch/pytorch#159299), and skipping by it made the weights' gradients zero, silently.
        x, weight = ctx.saved_tensors
        grad_2d = grad.flatten(0, -2)
        grad_bias = grad_2d.sum(0) if ctx.has_bias else None
        # dx through this Function again, not the bare op: under torch.func.grad the backward runs above the
        # transform, where an op without autograd fails; its own backward (aten) is there if anyone needs it.
        grad_x = _Linear.apply(grad, weight.T, None)
        return grad_x, grad_2d.T @ x.flatten(0, -2), grad_bias


def routes(x: Tensor, weight: Tensor) -> bool:
    """Whether linear(x, weight) takes oneDNN: float32 CPU tensors, no autocast, oneDNN not switched off
    (torch.backends.mkldnn.enabled), and no torch.func transform but at most one grad (a train step's), with
    an input that requires grad there.
    Under vmap, dynamo cannot batch an autograd.Function; under a second grad, one level is enough to keep
    the route simple. Every check here traces under torch.compile, which guards on the switch."""
    return (AVAILABLE and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and _at_most_one_grad(x, weight))


def _at_most_one_grad(x: Tensor, weight: Tensor) -> bool:
    if not torch._C._are_functorch_transforms_active():  # dynamo cannot test peek_interpreter_stack() for None
        return True
    innermost = coerce_cinterpreter(peek_interpreter_stack())
    # Under grad, dynamo keeps the autograd.Function only where it sees an input requiring grad; it reads a
    # function's own inputs as not requiring it and inlines forward (pytorch/pytorch#193279), where the custom
    # op has no gradient: the compile fails. A train step's layers all see an input that requires grad.
    return (innermost.level() == 1 and innermost.key() == TransformType.Grad
            and (x.requires_grad or weight.requires_grad))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), its forward product and input gradient in oneDNN where `routes` says so."""
    return _Linear.apply(x, weight, bias) if routes(x, weight) else F.linear(x, weight, bias)
