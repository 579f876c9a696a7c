"""The train step: against eager, against the nn.Module + torch.optim loop, one graph, exact resume."""

import functools
import signal

import optree
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import minifn.step as step_module
from conftest import COMPILED_VS_EAGER_ADAM, tiny_config, unique_graphs
from conftest import relative_error as rel
from minifn import optim, schedules
from minifn.checkpoint import load_state, make_header
from minifn.compiling import DROPOUT_OPTIONS, maybe_compile
from minifn.config import Config, OptimConfig
from minifn.data import batches
from minifn.loop import DataSpec, Interrupted, fit
from minifn.losses import IGNORE_INDEX, cross_entropy
from minifn.model import init_params
from minifn.reference import ReferenceTransformer
from minifn.rng import fold_in
from minifn.run import optimizer_from_config
from minifn.step import init_state, make_eval_step, make_train_step, train_step

CONFIG = tiny_config()
ADAMW = optim.adamw(lr=3e-3, weight_decay=0.1)


def random_tokens(n=400):
    return torch.randint(0, CONFIG.vocab_size, (n,))


@pytest.fixture(scope="session")
def compiled_step():
    """The one compiled step the tests share (tiny config, AdamW): about 20 s to build."""
    return make_train_step(CONFIG, ADAMW, compile="on")


@pytest.mark.slow
def test_compiled_matches_eager_and_compiles_once_per_run(compiled_step):
    eager_step = make_train_step(CONFIG, ADAMW, compile="off")
    tokens = random_tokens()
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    eager, compiled = init_state(params, ADAMW), init_state(params, ADAMW)
    before, bypassed = unique_graphs(), counters["aot_autograd"]["autograd_cache_bypass"]
    for i, batch in enumerate(batches(tokens, 16, 8, 4)):  # 49 windows: the last batch is topped up
        eager, m_eager = eager_step(eager, batch)
        compiled, m_compiled = compiled_step(compiled, batch)
        if i == 4:
            assert rel(compiled.params, eager.params) < COMPILED_VS_EAGER_ADAM
            torch.testing.assert_close(m_compiled["loss"], m_eager["loss"], rtol=1e-5, atol=0)
    for lr in (1e-3, 5e-4):  # new learning rates and another epoch: still the same graph
        compiled = compiled._replace(opt_state=optim.set_hyperparams(compiled.opt_state, lr=lr))
        for batch in batches(tokens, 16, 8, 4, epoch=1, shuffle=True):
            compiled, _ = compiled_step(compiled, batch)
    assert unique_graphs() - before == 1
    assert int(compiled.step) == 3 * 13
    # AOTAutograd's cache took the graph (a disabled autocast region once made it refuse), so a new
    # process reuses the traced backward instead of redoing it: warm start 12 s -> 6 s at the seed shape.
    assert counters["aot_autograd"]["autograd_cache_bypass"] == bypassed


def test_eager_matches_module_and_torch_adamw():
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    module = ReferenceTransformer(CONFIG)
    module.load_state_dict(params)
    torch_opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.1)
    state = init_state({k: v.clone() for k, v in params.items()}, ADAMW)
    tokens = random_tokens(1000)
    for i, (x, y) in enumerate(batches(tokens, 16, 8, 4, shuffle=True)):
        if i == 20:
            break
        torch_opt.zero_grad()
        F.cross_entropy(module(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).backward()
        torch_opt.step()
        state, _ = train_step(state, (x, y), config=CONFIG, optimizer=ADAMW)
    assert rel(state.params, dict(module.named_parameters())) < 1e-5
    assert rel(state.params, params) > 1e-3  # training moved the parameters


DONATING = {
    "adamw": ADAMW,
    "adam-amsgrad-l2": optim.adam(lr=1e-2, amsgrad=True, weight_decay=0.1),
    "sgd-nesterov": optim.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "clip-adamw": optim.chain(optim.clip_by_global_norm(0.5),
                              optim.adamw(lr=1e-2, schedule=lambda s, lr: lr / (1 + s))),
    # the second clip sees the first one's output: factors of a chain do not simply multiply
    "clip-clip-adamw": optim.chain(optim.clip_by_global_norm(0.5), optim.clip_by_global_norm(0.05),
                                   optim.adamw(lr=1e-2)),
}


def buffers(state):
    """The tensors of a state that hold more than one number (0-D counters and values are always new)."""
    return [x for x in optree.tree_leaves(state) if x.ndim]


def assert_donated_equals_pure(step_pure, step_donated, tx, steps=4, exact=True):
    """step_donated keeps the state's storage and gives step_pure's values: bit for bit where both run the
    same kernels (exact), else within compiled-against-eager noise."""
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    pure = init_state(params, tx, seed=3, ema=0.9)
    donated = init_state(optree.tree_map(torch.clone, params), tx, seed=3, ema=0.9)
    storage = [x.data_ptr() for x in buffers(donated)]
    tokens = random_tokens()
    for batch in list(batches(tokens, 16, 8, 4))[:steps]:
        pure, m_pure = step_pure(pure, batch)
        donated, m_donated = step_donated(donated, batch)
        tol = 0 if exact else 1e-5
        torch.testing.assert_close(m_donated["loss"], m_pure["loss"], rtol=tol, atol=0)
    assert [x.data_ptr() for x in buffers(donated)] == storage  # one copy of each tree, written in place
    if exact:
        pairs = zip(optree.tree_leaves(pure), optree.tree_leaves(donated), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    else:
        assert rel(donated, pure) < COMPILED_VS_EAGER_ADAM
    assert rel(pure.params, params) > 1e-3


@pytest.mark.parametrize("name,fused", [(n, False) for n in DONATING]
                         + [(n, True) for n, tx in DONATING.items() if tx.fused_step])
def test_eager_donated_state_is_updated_in_place_with_the_pure_steps_values(name, fused):
    """The composed blocks donated give the pure step's bits; adam(w)'s fused kernel gives them to rounding."""
    tx = DONATING[name] if fused else DONATING[name]._replace(fused_step=None)
    assert_donated_equals_pure(make_train_step(CONFIG, tx, compile="off", dropout_rate=0.1),
                               make_train_step(CONFIG, tx, compile="off", dropout_rate=0.1, inplace=True), tx,
                               exact=not fused)


class AtenCalls(TorchDispatchMode):
    """The names of the aten ops dispatched under this mode."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def fused_kernel_calls(graph: torch.fx.Graph) -> int:
    return sum(n.op == "call_function" and "fused_adam_" in str(n.target) for n in graph.nodes)


@pytest.mark.parametrize("optimizer,fused", [("adamw", True), ("adam", True), ("sgd", False)])
def test_minifn_trains_with_torchs_fused_kernel_when_the_state_is_donated(optimizer, fused):
    """minifn train's optimizer (clipping, then the chosen one) takes the fused Adam kernel, eager and donated;
    a pure step composes the blocks, and SGD has no fused kernel here. Compiled alike: the graph dynamo
    captures (run by a recording backend, nothing is compiled) calls the kernel exactly when donated."""
    tx, _ = optimizer_from_config(OptimConfig(optimizer=optimizer), steps_per_epoch=4, total_steps=8)
    batch = next(batches(random_tokens(), 16, 8, 4))
    for inplace in (True, False):
        step = make_train_step(CONFIG, tx, compile="off", inplace=inplace)
        with AtenCalls() as calls:
            step(init_state(init_params(CONFIG, 0), tx), batch)
        assert ("fused_adam_" in calls.names) == (fused and inplace), inplace
        applied_updates = bool(calls.names & {"_foreach_add", "_foreach_add_"})  # apply_updates: composed blocks
        assert applied_updates != (fused and inplace), inplace  # one or the other, never both
        # the loss was divided by the token count before the backward pass: no pass over the gradients to do it
        assert not calls.names & {"_foreach_div", "_foreach_div_"}
        # clipping is folded into the fused kernel (its grad_scale): no pass of its own over the gradients
        assert ("_foreach_mul" in calls.names) != (fused and inplace), inplace
        graphs = []

        def record(gm, _, graphs=graphs):
            graphs.append(gm.graph)
            return gm.forward

        recorded = torch.compile(functools.partial(train_step, config=CONFIG, optimizer=tx, inplace=inplace),
                                 fullgraph=True, backend=record)
        recorded(init_state(init_params(CONFIG, 0), tx), batch)
        assert fused_kernel_calls(graphs[-1]) == (fused and inplace), inplace


@pytest.mark.slow
def test_compiled_donated_state_is_updated_in_place_with_the_pure_steps_values():
    eager = make_train_step(CONFIG, ADAMW, compile="off")
    assert_donated_equals_pure(eager, make_train_step(CONFIG, ADAMW, compile="on", inplace=True), ADAMW, exact=False)


def test_accumulated_micro_batches_equal_one_big_batch_and_torchs_step():
    """Two micro-batches with unequal counts of valid targets give the big batch's step: the loss is the mean
    over all valid targets, as F.cross_entropy(ignore_index) on the module and torch's SGD compute it."""
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    sgd = optim.sgd(lr=0.5)
    state = init_state(params, sgd)
    x, y = next(batches(random_tokens(), 16, 4, 8))
    y[5:, 3:] = IGNORE_INDEX  # unequal valid counts per micro-batch
    big, m_big = train_step(state, (x, y), config=CONFIG, optimizer=sgd)
    acc, m_acc = train_step(state, (x.view(2, 4, 16), y.view(2, 4, 16)), config=CONFIG, optimizer=sgd)
    module = ReferenceTransformer(CONFIG)
    module.load_state_dict(params)
    loss = F.cross_entropy(module(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    reference = dict(module.named_parameters())
    assert rel(big.params, reference) < 1e-6 and rel(acc.params, reference) < 1e-6
    assert rel(acc.params, params) > 1e-4  # the step moved the parameters
    torch.testing.assert_close(m_acc["loss"], m_big["loss"])
    torch.testing.assert_close(m_acc["loss"], loss.detach())


def test_clipping_and_bf16_autocast_run_and_learn():
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adam(lr=1e-2))
    state = init_state(init_params(CONFIG, 0), tx)
    batch = next(batches(random_tokens(), 16, 8, 4))
    first = None
    for _ in range(15):
        state, m = train_step(state, batch, config=CONFIG, optimizer=tx, autocast_dtype=torch.bfloat16)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first - 0.5
    assert all(v.dtype == torch.float32 for v in state.params.values())


def test_dropout_draws_from_the_state_key_and_the_step():
    sgd = optim.sgd(lr=0.1)
    batch = next(batches(random_tokens(), 16, 8, 4))
    params = init_params(CONFIG, 0)

    def one_step(seed, dropout_rate, step=0):
        state = init_state(params, sgd, seed=seed)._replace(step=torch.tensor(step))
        return train_step(state, batch, config=CONFIG, optimizer=sgd, dropout_rate=dropout_rate)[1]["loss"]

    assert torch.equal(one_step(1, 0.0), one_step(2, 0.0))  # no dropout: the key is unused
    assert torch.equal(one_step(1, 0.2), one_step(1, 0.2))
    assert not torch.equal(one_step(1, 0.2), one_step(2, 0.2))
    assert not torch.equal(one_step(1, 0.2), one_step(1, 0.2, step=1))
    assert not torch.equal(one_step(1, 0.2), one_step(1, 0.0))


@pytest.mark.slow
def test_compiled_dropout_step_draws_the_eager_masks(monkeypatch):
    """make_train_step compiles dropout with DROPOUT_OPTIONS (each key and mask computed once): the same
    masks as eager, so the same loss and parameters to float rounding; another key differs by far more."""
    passed = []
    monkeypatch.setattr(step_module, "maybe_compile",
                        lambda fn, *args: passed.append(args[2:]) or maybe_compile(fn, *args))
    compiled = make_train_step(CONFIG, ADAMW, dropout_rate=0.3, compile="on")
    assert passed == [(DROPOUT_OPTIONS,)]
    eager = make_train_step(CONFIG, ADAMW, dropout_rate=0.3, compile="off")
    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    batch = next(batches(random_tokens(), 16, 8, 4))
    (a, m_a), (b, m_b) = (step(init_state(params, ADAMW, seed=3), batch) for step in (compiled, eager))
    (a, m_a), (b, m_b) = compiled(a, batch), eager(b, batch)
    torch.testing.assert_close(m_a["loss"], m_b["loss"], rtol=1e-5, atol=0)
    assert rel(a.params, b.params) < COMPILED_VS_EAGER_ADAM
    other, _ = eager(init_state(params, ADAMW, seed=4), batch)
    assert rel(other.params, b.params) > 1e-3


def DECAY(s, lr):
    return lr * 0.99 ** s.to(lr.dtype)


def _run(tmp_path, name, stop_after=None, progress=None, state=None):
    spec = DataSpec(seq_len=16, stride=8, batch_size=3, grad_accum_steps=2, shuffle=True, seed=5)
    tokens = torch.arange(300) % CONFIG.vocab_size
    tx = optim.adamw(lr=1e-2, schedule=DECAY)
    state = state or init_state(init_params(CONFIG, 0), tx, seed=7)
    step = make_train_step(CONFIG, tx, dropout_rate=0.1, compile="off")  # resume must restore the RNG too
    calls = iter(range(10**6))
    stop = (lambda: signal.SIGINT if next(calls) == stop_after else None) if stop_after is not None else (lambda: None)
    path = tmp_path / f"{name}.pt"
    return fit(state, step, tokens, spec, num_epochs=3, device="cpu", checkpoint_path=path,
               header=make_header(Config(model=CONFIG), {"name": "t", "sha256": "0"}, {"sha256": "0", "tokens": 300}),
               progress=progress, save_every=1, stop_requested=stop,
               lr_of=lambda s: optim.current_lr(s.opt_state, DECAY)), path, tx


@pytest.mark.parametrize("stop_after", [3, 7, 13])  # mid-epoch, at an epoch boundary, mid-epoch after a save
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, stop_after):
    from minifn import checkpoint

    uninterrupted, _, tx = _run(tmp_path, "full")
    with pytest.raises(Interrupted) as stopped:
        _run(tmp_path, "cut", stop_after=stop_after)
    template = init_state(init_params(CONFIG, 1), tx, seed=99)  # every leaf must come from the checkpoint
    state, progress = load_state(*checkpoint.load(stopped.value.path), template)
    assert 0 < int(state.step) < int(uninterrupted.step)
    resumed, _, _ = _run(tmp_path, "cut", progress=progress, state=state)
    assert int(resumed.step) == int(uninterrupted.step)
    for a, b in zip(optree.tree_leaves(resumed), optree.tree_leaves(uninterrupted)):
        assert torch.equal(a, b)


def test_metrics_read_one_step_late_are_exact(tmp_path):
    """fit reads step k's metrics after queueing step k+1; the logged values must be step k's own."""
    import json

    from minifn import checkpoint

    _, path, tx = _run(tmp_path, "log")
    logged = [json.loads(line) for line in checkpoint.metrics_path(path).read_text().splitlines()]
    logged = [e for e in logged if e["kind"] == "step"]
    spec = DataSpec(seq_len=16, stride=8, batch_size=3, grad_accum_steps=2, shuffle=True, seed=5)
    from minifn.loop import _groups

    state = init_state(init_params(CONFIG, 0), tx, seed=7)
    step = make_train_step(CONFIG, tx, dropout_rate=0.1, compile="off")
    expected = []
    for epoch in range(3):
        for group in _groups(torch.arange(300) % CONFIG.vocab_size, spec, epoch, 0):
            lr = optim.current_lr(state.opt_state, DECAY)
            state, m = step(state, (torch.stack([g[0] for g in group]), torch.stack([g[1] for g in group])))
            expected.append((int(state.step), float(m["loss"]), float(m["grad_norm"]), float(lr)))
    assert [(e["step"], e["loss"], e["grad_norm"], e["lr"]) for e in logged] == expected


def test_eager_gradients_through_autograd_equal_functorchs():
    """Eagerly at the outermost level the step differentiates with torch.autograd.grad (no create_graph,
    half the peak memory); the gradients must be functorch's up to summation order."""
    from minifn import step as step_module

    params = init_params(CONFIG, seed=int(torch.randint(0, 1000, ())))
    x, y = next(batches(random_tokens(), 16, 8, 4))
    batch = (x.view(2, 2, 16), y.view(2, 2, 16))
    ours = step_module.loss_and_grads(params, batch, torch.tensor(3), config=CONFIG, dropout_rate=0.1, log_gns=True)
    functorch = torch.func.grad_and_value(step_module._summed_loss, has_aux=True)
    grads, loss = None, 0.0
    for a in range(2):
        g, (_, total) = functorch(params, x.view(2, 2, 16)[a], y.view(2, 2, 16)[a], CONFIG, cross_entropy, None, 0.1,
                                  fold_in(torch.tensor(3), a), None)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        loss = loss + total
    assert rel(ours[0], grads) < 1e-6 and rel(ours[0], params) > 1e-3
    torch.testing.assert_close(ours[1], loss, rtol=1e-6, atol=0)
    # a divisor divides the differentiated loss: the gradients come out divided, the loss and the noise-scale
    # sums (of the summed gradients) stay as they were
    divided = step_module.loss_and_grads(params, batch, torch.tensor(3), config=CONFIG, dropout_rate=0.1,
                                         log_gns=True, divisor=torch.tensor(37))
    assert rel(divided[0], {k: v / 37 for k, v in grads.items()}) < 1e-6
    torch.testing.assert_close(divided[1], loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(divided[3], ours[3], rtol=1e-5, atol=0)
    # inside a transform (here vmap over two copies) the functorch path runs and agrees as well
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    vmapped = torch.func.vmap(lambda p: step_module.loss_and_grads(p, batch, torch.tensor(3), config=CONFIG,
                                                                   dropout_rate=0.1)[0])(stacked)
    assert rel({k: v[1] for k, v in vmapped.items()}, grads) < 1e-6


def test_a_batch_the_model_cannot_take_is_refused_before_the_step():
    """Out-of-range ids train on nothing compiled (and abort the process in an embedding): the factory's
    step checks the batch first, eager or compiled alike, and leaves the state untouched."""
    from minifn.sweep import make_sweep_step, sweep_states

    step, evaluate = make_train_step(CONFIG, ADAMW, compile="off"), make_eval_step(CONFIG, compile="off")
    sweep = make_sweep_step(CONFIG, ADAMW, compile="off")
    state = init_state(init_params(CONFIG, 0), ADAMW)
    before = optree.tree_map(torch.clone, state)
    x, y = next(batches(random_tokens(), 16, 8, 4))
    V, T = CONFIG.vocab_size, CONFIG.max_seq_len
    bad = [
        ((x, torch.full_like(y, V)), "outside the vocabulary"),
        ((x, torch.full_like(y, -1)), "outside the vocabulary"),
        ((torch.full_like(x, V), y), "outside the vocabulary"),
        (x, r"a pair \(inputs, targets\)"),
        ((x[:, :8], y), "one shape"),
        ((x.float(), y), "int64 or int32"),
        ((torch.zeros(2, T + 1, dtype=torch.long),) * 2, f"longer than max_seq_len {T}"),
    ]
    for batch, message in bad:
        with pytest.raises(ValueError, match=message):
            step(state, batch)
        with pytest.raises(ValueError, match=message):
            evaluate(state.params, batch)
        with pytest.raises(ValueError, match=message):
            sweep(sweep_states(state.params, ADAMW, [{"lr": 1e-3}, {"lr": 1e-2}]), batch)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(state), optree.tree_leaves(before)))
    ignored = y.clone()
    ignored[:, :3] = IGNORE_INDEX
    step(state, (x, ignored))  # IGNORE_INDEX targets are fine
    with pytest.raises(ValueError, match="does not fit the config"):
        step(state._replace(params={k: v for k, v in state.params.items() if k != "norm.weight"}), (x, y))


@pytest.mark.parametrize("make,message", [
    (lambda: make_train_step(CONFIG, ADAMW, dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    (lambda: make_train_step(CONFIG, ADAMW, dropout_rate=-0.1), r"dropout_rate must be in \[0, 1\)"),
    (lambda: make_train_step(CONFIG, ADAMW, reduction="avg"), "reduction must be 'mean' or 'sum'"),
    (lambda: init_state(init_params(CONFIG, 0), ADAMW, ema=1.0), r"decay must be in \[0, 1\)"),
    (lambda: schedules.linear(0.5, 1.0, total_iters=0), "total_iters must be at least 1"),
    (lambda: schedules.cosine(0), "t_max must be at least 1"),
    (lambda: optim.set_hyperparams(ADAMW.init(init_params(CONFIG, 0)), warmup_steps=2.7), "whole number"),
])
def test_settings_the_step_would_misread_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("overrides", [dict(embed_dim=16), dict(vocab_size=40), dict(ff_dim=40)])
def test_a_tree_of_another_shape_is_refused_before_the_step(overrides):
    """apply takes its sizes from the tensors, so a tree made for another config (same names) used to train
    silently, and one of a smaller vocabulary passed the id check (against the config's) into its embedding."""
    from minifn.sweep import make_sweep_step, sweep_states

    params = init_params(tiny_config(**overrides), 0)
    x, y = next(batches(random_tokens(), 16, 8, 4))
    with pytest.raises(ValueError, match="has shape .* where the config's model has"):
        make_train_step(CONFIG, ADAMW, compile="off")(init_state(params, ADAMW), (x, y))
    with pytest.raises(ValueError, match="has shape .* where the config's model has"):
        make_eval_step(CONFIG, compile="off")(params, (x, y))
    with pytest.raises(ValueError, match="has shape .* where the config's model has"):
        make_sweep_step(CONFIG, ADAMW, compile="off")(sweep_states(params, ADAMW, [{"lr": 1e-3}] * 2), (x, y))
    make_sweep_step(CONFIG, ADAMW, compile="off")(sweep_states(init_params(CONFIG, 0), ADAMW, [{"lr": 1e-3}] * 2),
                                                  (x, y))  # a stacked tree of the config's shape is fine
