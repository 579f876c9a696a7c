"""minifn.onednn: linear layers whose forward product runs in oneDNN compute F.linear's values and gradients,
eager and compiled, and take that route exactly where it holds."""

import pytest
import torch
import torch.nn.functional as F

from conftest import relative_error, tiny_config
from minifn import onednn
from minifn.losses import cross_entropy
from minifn.model import apply, init_params

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN's linear kernel: x86 CPU builds of torch")

# Every branch of the model's linear layers: biases, and a head of its own as well as the projections.
CONFIG = tiny_config(bias=True, tie_embeddings=False)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the oneDNN kernel's calls at run time: eager, and from inductor's compiled code alike."""
    calls = []
    kernel = onednn._kernel

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(onednn, "_kernel", counted)
    return calls


def summed_loss(params, tokens, targets):
    return cross_entropy(apply(params, tokens, CONFIG), targets, reduction="sum")


def random_batch():
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.max_seq_len))
    return tokens, torch.randint(0, CONFIG.vocab_size, tokens.shape)


def f_linear_grads(monkeypatch, params, tokens, targets):
    with monkeypatch.context() as m:
        m.setattr(onednn, "AVAILABLE", False)
        return torch.func.grad(summed_loss)(params, tokens, targets)


def assert_each_leaf_close(got, want, tol=1e-5):
    """Leaf by leaf, so that one layer's missing gradient cannot hide in the norm of the rest."""
    assert got.keys() == want.keys()
    for name in want:
        assert relative_error(got[name], want[name]) < tol, name


def test_linear_equals_f_linear_for_any_layout():
    x = torch.randn(3, 40, 5).transpose(1, 2)  # [3, 5, 40], not contiguous
    bias = torch.randn(24)
    # the weight as stored, transposed (as the backward passes it), and strided both ways
    for weight in (torch.randn(24, 40), torch.randn(40, 24).T, torch.randn(24, 80)[:, ::2], torch.randn(48, 40)[::2]):
        for b in (bias, None):
            torch.testing.assert_close(onednn.linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_eager_gradients_equal_f_linears(monkeypatch, onednn_calls):
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    tokens, targets = random_batch()
    got = torch.func.grad(summed_loss)(params, tokens, targets)
    # y = x W^T and dx = dy W for qkv, out, up and down in each layer, and for the head
    assert len(onednn_calls) == 2 * (4 * CONFIG.num_layers + 1)
    assert_each_leaf_close(got, f_linear_grads(monkeypatch, params, tokens, targets))


@pytest.mark.slow
def test_compiled_gradients_equal_f_linears(monkeypatch, onednn_calls):
    """Compiled under torch.func.grad, the Function's backward must survive (pytorch/pytorch#193279 drops it in
    other constructions), and every gradient come out (skipping by ctx.needs_input_grad zeroed the weights')."""
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    tokens, targets = random_batch()
    got = torch.compile(torch.func.grad(summed_loss), fullgraph=True)(params, tokens, targets)
    assert len(onednn_calls) == 2 * (4 * CONFIG.num_layers + 1)  # the compiled code ran oneDNN's kernel
    assert_each_leaf_close(got, f_linear_grads(monkeypatch, params, tokens, targets))


def test_routes_only_where_the_function_holds():
    """oneDNN with no transform or one grad; F.linear under vmap, a second grad, in float64, under autocast,
    and with oneDNN switched off."""
    weight = torch.randn(6, 4)
    seen = []

    def probe(x):
        seen.append(onednn.routes(x, weight))
        return (x @ weight.T).sum()

    x = torch.randn(3, 4)
    probe(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(probe)(x)
    torch.func.vmap(torch.func.grad(probe))(x)
    torch.func.grad(lambda x: torch.func.grad(lambda x: probe(x).sin())(x).sum())(x)
    seen.append(onednn.routes(x.double(), weight.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(x)
    with torch.backends.mkldnn.flags(enabled=False):
        probe(x)
    assert seen == [True, True, False, False, False, False, False, False]


def test_a_vmapped_model_takes_f_linear(onednn_calls):
    """An ensemble: members with their own weights, under vmap (which dynamo cannot batch the route in)."""
    members = [init_params(CONFIG, seed=s) for s in range(3)]
    stacked = {name: torch.stack([p[name] for p in members]) for name in members[0]}
    tokens, _ = random_batch()
    got = torch.func.vmap(lambda p: apply(p, tokens, CONFIG))(stacked)
    assert not onednn_calls
    for i, params in enumerate(members):
        torch.testing.assert_close(got[i], apply(params, tokens, CONFIG), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_compiled_grad_of_a_function_of_its_own_weight_and_input(argnums):
    """Dynamo reads a grad-transformed function's own inputs as not requiring grad, and so inlined the route's
    forward, whose custom op has no gradient: the compile failed. Such a linear takes F.linear instead."""
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(24, 40, generator=g), torch.randn(3, 5, 40, generator=g)

    def loss(linear):
        return lambda weight, x: linear(x, weight).sin().sum()

    got = torch.compile(torch.func.grad(loss(onednn.linear), argnums), fullgraph=True)(weight, x)
    want = torch.func.grad(loss(F.linear), argnums)(weight, x)
    for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
