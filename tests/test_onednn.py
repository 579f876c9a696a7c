"""minifn.onednn: linear layers whose forward product runs in oneDNN compute F.linear's values and gradients,
eager and compiled, and take that route exactly where it holds; the timed route takes the library its
measurement found faster, remembers it across processes, and is chosen at run time in compiled code too.
(conftest fixes MINIFN_LINEAR=onednn; the tests of the timed route set it back.)"""

import json
import types

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import TINY_FLAGS, relative_error, story_file, tiny_config
from minifn import onednn
from minifn.cli import cli
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


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """The timed route, with a route file of its own and nothing remembered yet (as a new process)."""
    monkeypatch.setenv("MINIFN_LINEAR", "tuned")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(onednn, "MIN_TIMED_MACS", 0)  # the tiny model's products are timed too
    new_process()
    yield tmp_path
    new_process()  # later tests must not see this file's choices


def new_process():
    """Forget this process's choices, as a new process would start."""
    onednn._choices.cache_clear()


def timer_saying(monkeypatch, faster: str):
    """Replace the measurement by one that finds `faster` faster, and count the measurements."""
    measured = []

    def fake(calls):
        measured.append(sorted(calls))
        return {name: 1.0 if name == faster else 2.0 for name in calls}

    monkeypatch.setattr(onednn, "_best_seconds", fake)
    return measured


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
    grads = torch.compile(torch.func.grad(summed_loss), fullgraph=True)
    got = grads(params, tokens, targets)
    assert len(onednn_calls) == 2 * (4 * CONFIG.num_layers + 1)  # the compiled code ran oneDNN's kernel
    want = f_linear_grads(monkeypatch, params, tokens, targets)
    assert_each_leaf_close(got, want)
    # the route is chosen when the product runs, not when it is traced: the same compiled code takes aten
    onednn_calls.clear()
    monkeypatch.setenv("MINIFN_LINEAR", "aten")
    assert_each_leaf_close(grads(params, tokens, targets), want)
    assert not onednn_calls


def test_the_timed_route_takes_the_faster_library_and_remembers_it(monkeypatch, tuned, onednn_calls):
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    tokens, targets = random_batch()
    want = f_linear_grads(monkeypatch, params, tokens, targets)
    measured = timer_saying(monkeypatch, "aten")
    assert_each_leaf_close(torch.func.grad(summed_loss)(params, tokens, targets), want)
    assert not onednn_calls  # aten was measured faster for every product
    # one measurement per distinct product (shape and weight layout), each of both libraries
    routes = json.loads((tuned / "minifn-linear-routes.json").read_text())
    assert len(measured) == len(routes) and all(m == ["aten", "onednn"] for m in measured)
    assert len(routes) >= 5 and not any(routes.values())
    torch.func.grad(summed_loss)(params, tokens, targets)
    assert len(measured) == len(routes)  # remembered in this process: no second measurement

    new_process()
    timer_saying(monkeypatch, "onednn")  # would say otherwise, but the file is read first
    torch.func.grad(summed_loss)(params, tokens, targets)
    assert not onednn_calls

    new_process()
    (tuned / "minifn-linear-routes.json").unlink()
    measured = timer_saying(monkeypatch, "onednn")
    assert_each_leaf_close(torch.func.grad(summed_loss)(params, tokens, targets), want)
    assert len(onednn_calls) == 2 * (4 * CONFIG.num_layers + 1) and len(measured) == len(routes)


def test_the_measurement_times_both_libraries_once_per_product(monkeypatch, tuned):
    calls = []
    best_seconds = onednn._best_seconds

    def recorded(fns):
        seconds = best_seconds(fns)
        calls.append(seconds)
        return seconds

    monkeypatch.setattr(onednn, "_best_seconds", recorded)
    x, weight = torch.randn(64, 96), torch.randn(128, 96)
    first = onednn.faster_in_onednn(x, weight, None)
    assert onednn.faster_in_onednn(x, weight, None) == first and len(calls) == 1
    assert set(calls[0]) == {"onednn", "aten"} and all(0 < s < 1 for s in calls[0].values())
    assert first == (calls[0]["onednn"] < calls[0]["aten"])
    onednn.faster_in_onednn(x, weight.T.contiguous().T, None)  # another layout: measured on its own
    assert len(calls) == 2


def test_small_products_take_aten_unmeasured(monkeypatch, tuned, onednn_calls):
    monkeypatch.setattr(onednn, "MIN_TIMED_MACS", 64 * 96 * 128)
    measured = timer_saying(monkeypatch, "onednn")
    x, weight = torch.randn(64, 96), torch.randn(127, 96)  # one output short of the threshold
    torch.testing.assert_close(onednn.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert not measured and not onednn_calls and not (tuned / "minifn-linear-routes.json").exists()
    onednn.linear(x, torch.randn(128, 96))
    assert len(measured) == 1 and len(onednn_calls) == 1


def test_a_mistyped_route_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIFN_LINEAR", "mkl")
    with pytest.raises(onednn.RouteSettingError, match="choose one of tuned, onednn, aten"):
        onednn.faster_in_onednn(torch.randn(2, 3), torch.randn(4, 3), None)
    result = CliRunner().invoke(cli, ["train", "--dataset", str(story_file(tmp_path, 300)), "--model",
                                      str(tmp_path / "m.pt"), *TINY_FLAGS, "--num-epochs", "1"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: MINIFN_LINEAR='mkl' is not a route: choose one of tuned, onednn, aten"
    assert not (tmp_path / "m.pt").exists()


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


def test_a_shapes_first_call_returns_its_measurements_result(monkeypatch, tuned, onednn_calls):
    """The measurement computes the product with both libraries; the call returns the faster one's last result
    rather than computing it a further time, and a second call computes it once."""
    aten_calls = []
    monkeypatch.setattr(onednn, "F", types.SimpleNamespace(linear=lambda *a: aten_calls.append(1) or F.linear(*a)))
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    x, weight, bias = torch.randn(64, 96, generator=g), torch.randn(128, 96, generator=g), torch.randn(128, generator=g)
    out = onednn.linear_product(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    rounds = len(onednn_calls)
    assert rounds in (2, 3) and len(aten_calls) == rounds  # the timed rounds, and nothing more
    onednn.linear_product(x, weight, bias)
    assert len(onednn_calls) + len(aten_calls) == 2 * rounds + 1
