"""Linear layers whose forward product and input gradient run in oneDNN on x86 CPUs in float32, where MKL is slow.

aten sends every float32 product on an x86 CPU to MKL. On the AMD EPYC machines measured here, MKL runs
products with a short inner dimension (the embedding width) at 55-70% of its own peak, and oneDNN, which
PyTorch also ships, runs them up to 1.9x faster: the head's x W^T (256 x 256 x 32000 at the seed shape) most of
all (benchmarks/gemm_backends.py). `linear` computes the forward product y = x W^T and the input's gradient
dx = dy W there (the same kernel, with W^T as the weight: a view, never copied). The weight's gradient
stays in aten: oneDNN computes it fast only transposed, and the copy back costs what it saves. Everywhere else
(GPU, other dtypes, autocast, under vmap) it is F.linear, and so it is with oneDNN switched off:
`torch.backends.mkldnn.flags(enabled=False)` around the first call of a step (its trace).

Mechanics: the oneDNN call is a custom op (opaque to dynamo, with a fake kernel for tracing), wrapped in an
autograd.Function whose backward computes dx by the same Function and dW by aten. torch.func.grad and
torch.compile both keep that backward: tests/test_onednn.py checks the whole model's gradients, eager and
compiled, against F.linear's.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import coerce_cinterpreter

AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """aten's entry to oneDNN's linear (with no fused activation: "none")."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("minifn::onednn_linear", mutates_args=(), device_types="cpu")
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight^T + bias by oneDNN; no autograd of its own (see _Linear)."""
    return _kernel(x.contiguous(), weight, bias)  # any weight layout: oneDNN reads its strides


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Linear(torch.autograd.Function):
    """F.linear's function and gradients, with y = x W^T and dx = dy W in oneDNN and dW in aten."""

    @staticmethod
    def forward(x, weight, bias):
        return onednn_linear(x, weight, bias)

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
