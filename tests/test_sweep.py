"""Sweeps: every member of a vmapped sweep equals the same run trained alone, eager and compiled, and a
member that diverges is frozen while the others go on."""

import math

import optree
import pytest
import torch

from conftest import relative_error, tiny_config
from minifn import optim, unstack_trees
from minifn.data import batches
from minifn.model import init_params
from minifn.step import init_state, train_step
from minifn.sweep import make_sweep_step, math_attention_pays, sweep_states

CONFIG = tiny_config()
STEPS = 5
# Compiled, the fused kernels round differently from eager, and SGD at lr 0.3 with momentum 0.9 grows that
# noise: over 12 steps up to 1e-5 relative across seeds and CPUs (CI saw 1.01e-5). Members differ from each
# other by about 8 relative, so 1e-4 still tells any two apart by five orders of magnitude.
COMPILED_TOL = 1e-4
# Eager, a member is differentiated by functorch inside vmap and its run alone by torch.autograd (see
# step._grad_and_value): the same kernels, summed in another order, 1e-7 apart in the gradients. With SGD
# that stays at float level (eager members get the compiled tolerance). Adam's first steps (about
# lr * sign(g)) turn it into whole-lr moves of near-zero gradients: up to 2e-4 relative on a tiny leaf
# seen after 5 steps, so the Adam test compares the whole state as one vector: at most 4.4e-6 over 25
# seeds here, so 3e-5 leaves room for other CPUs; members (different seeds) differ by order 1.
EAGER_TOL = COMPILED_TOL
ADAM_TOL = 3e-5
# SGD is linear in the gradient, so compiled and eager agree to float noise (Adam's first steps, about
# lr * sign(g), turn that noise into whole-lr jumps; see test_trees). Built with nonzero momentum and
# weight decay so that each member can set its own, including 0.
SGD = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
SGD_MEMBERS = [dict(lr=0.3, weight_decay=0.0), dict(lr=0.1, weight_decay=0.1), dict(lr=0.03, weight_decay=0.3)]
EMA = 0.8
HUGE_LR = 1e30  # finite, so the first step is too; the weights it gives overflow the next forward pass


def data(steps=STEPS):
    """Batches of two micro-batches of 2 windows, [2, 2, 16] (so the noise scale is defined)."""
    tokens = torch.randint(0, CONFIG.vocab_size, (600,))
    return [(x.view(2, 2, 16), y.view(2, 2, 16)) for _, (x, y) in zip(range(steps), batches(tokens, 16, 8, 4))]


def alone(params, hyper, batches_, *, base, make, seed=0, dropout=0.0, ema=EMA, log_gns=False):
    """The run of one member on its own: its optimizer built with its values, a Python-float dropout rate.
    Returns the state after each step, and the last step's metrics."""
    tx = make(**{**base, **hyper})
    state = init_state(params, tx, seed=seed, ema=ema)
    states, metrics = [], None
    for batch in batches_:
        state, metrics = train_step(state, batch, config=CONFIG, optimizer=tx, dropout_rate=dropout, log_gns=log_gns)
        states.append(state)
    return states, metrics


def trained(state):
    """What training changes: parameters, EMA, step, key and the optimizer's buffers and counts (not its
    hyperparameters: set_hyperparams also sets an unused weight_decay that a solo SGD leaves at 0)."""
    buffers = [x for x in optree.tree_leaves(state.opt_state) if x.ndim > 0 or not x.is_floating_point()]
    return state.params, state.ema, state.step, state.rng, buffers


def assert_same(member, solo, tol, whole=False):
    """Integer leaves equal, float leaves within tol relative (each leaf, or whole=True: all float leaves
    as one vector, for Adam, whose tiny leaves' relative errors are heavy-tailed)."""
    pairs = list(zip(optree.tree_leaves(trained(member)), optree.tree_leaves(trained(solo)), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs if not a.is_floating_point())
    groups = [tuple(zip(*pairs))] if whole else [([a], [b]) for a, b in pairs if a.is_floating_point()]
    for a, b in groups:
        assert relative_error(a, b) <= tol


def test_eager_members_equal_their_runs_alone_with_their_own_dropout_and_seed():
    members = [dict(lr=3e-3, weight_decay=0.0), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-2, weight_decay=0.3)]
    rates, seeds = [0.0, 0.1, 0.2], [3, 4, 5]
    tx = optim.adamw(lr=1e-3, weight_decay=0.1)
    params = [init_params(CONFIG, s) for s in seeds]
    states = sweep_states(params, tx, members, seeds=seeds, ema=EMA)
    step = make_sweep_step(CONFIG, tx, dropout_rates=rates, compile="off")
    batches_ = data()
    for batch in batches_:
        states, metrics = step(states, batch)
    assert metrics["loss"].shape == (3,) and not metrics["frozen"].any()
    for k, member in enumerate(unstack_trees(states)):
        solo = alone(params[k], members[k], batches_, base=dict(lr=1e-3), make=optim.adamw, seed=seeds[k],
                     dropout=rates[k])[0][-1]
        # Adam with dropout at lr 3e-2 amplifies vmap's summation order most: whole-state error below 1e-6
        # for most seeds but heavy-tailed, 2.6e-4 at worst over 200 (seed 80). A dropout rate of 0.19 for 0.2
        # gives 0.4, another seed 0.75, and an lr 3% off 6e-2.
        assert_same(member, solo, 2e-3, whole=True)
        assert int(member.step) == STEPS


@pytest.fixture(scope="module")
def compiled_sweep():
    """The one compiled sweep step the tests share (SGD with momentum and decay, EMA and noise scale on,
    writing into its input states as minifn sweep runs): about 40 s."""
    return make_sweep_step(CONFIG, optim.sgd(**SGD), log_gns=True, inplace=True, compile="on")


def storage(tree) -> list[int]:
    return [x.untyped_storage().data_ptr() for x in optree.tree_leaves(tree)]


@pytest.mark.slow
def test_compiled_members_equal_their_runs_alone(compiled_sweep):
    params = init_params(CONFIG, int(torch.randint(0, 1000, ())))
    states = sweep_states(params, optim.sgd(**SGD), SGD_MEMBERS, ema=EMA)
    batches_ = data()
    first = storage(states)
    for batch in batches_:
        states, metrics = compiled_sweep(states, batch)
    assert not metrics["frozen"].any() and storage(states) == first  # the same tensors, written in place
    for k, (hyper, member) in enumerate(zip(SGD_MEMBERS, unstack_trees(states))):
        solo, solo_metrics = alone(params, hyper, batches_, base=SGD, make=optim.sgd, log_gns=True)
        assert_same(member, solo[-1], COMPILED_TOL)
        for name in ("loss", "grad_norm", "gns_g2", "gns_trace"):
            torch.testing.assert_close(metrics[name][k], solo_metrics[name], rtol=1e-4, atol=0)


def diverged(metrics) -> bool:
    """What freezes a sweep's member: a non-finite loss or gradient norm."""
    return not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))


def diverging_lr(params, batches_):
    """An SGD learning rate whose run alone diverges within the batches, and that step (1-based)."""
    for lr in (30.0, 300.0, 3e3, 3e4, 3e5):
        tx = optim.sgd(**{**SGD, "lr": lr})
        state = init_state(params, tx)
        for i, batch in enumerate(batches_, 1):
            state, m = train_step(state, batch, config=CONFIG, optimizer=tx)
            if diverged(m):
                return lr, i
    raise AssertionError("no learning rate diverged")


# A diverging run is chaotic: float noise grows with the huge learning rate, so where exactly it diverges,
# and its last finite state, depend on rounding (compiled against eager, functorch against autograd). So
# the frozen member is checked against the sweep's own state before it froze (it must not have changed
# since). The compiled case uses an absurd learning rate: its first step is finite (weights near 1e29),
# its second step's loss is not, so the member freezes at step 2, keeping its state after step 1.
@pytest.mark.parametrize("compiled,lr", [(False, None), (False, HUGE_LR),
                                         pytest.param(True, HUGE_LR, marks=pytest.mark.slow)],
                         ids=["eager-diverging", "eager-huge-lr", "compiled-huge-lr"])
def test_a_diverging_member_is_frozen_and_the_others_go_on(compiled, lr, request):
    params = init_params(CONFIG, 0)
    batches_ = data(12)
    lr = 10 * diverging_lr(params, batches_)[0] if lr is None else lr  # 10x: diverges early, not at the edge
    # The healthy members must be stable over 12 steps: at SGD_MEMBERS[0]'s lr 0.3 (momentum 0.9) some data
    # sits at the edge of stability and amplifies float noise (sweep against alone over 16 seeds: median
    # 1.9e-7, but 1.1e-4 for one CI seed); at lr 0.1, at most 6e-8 over the same seeds.
    members = [{"lr": 0.1, "weight_decay": 0.0}, {"lr": lr, "weight_decay": 0.1}, SGD_MEMBERS[2]]
    states = sweep_states(params, optim.sgd(**SGD), members, ema=EMA)
    step = request.getfixturevalue("compiled_sweep") if compiled else make_sweep_step(CONFIG, optim.sgd(**SGD),
                                                                                       compile="off")
    member = lambda: optree.tree_map(torch.clone, unstack_trees(states)[1])  # noqa: E731 - copies: states change in place
    frozen, history = [], [member()]
    for batch in batches_:
        states, metrics = step(states, batch)
        frozen.append(metrics["frozen"].tolist())
        history.append(member())
    bad_step = 1 + [f[1] for f in frozen].index(True)  # the step (1-based) whose result was not finite
    assert lr != HUGE_LR or bad_step == 2
    assert frozen == [[False, False, False]] * (bad_step - 1) + [[False, True, False]] * (len(batches_) - bad_step + 1)
    runs = unstack_trees(states)
    assert int(runs[1].step) == bad_step - 1 and int(runs[0].step) == len(batches_)
    assert all(torch.isfinite(p).all() for p in runs[1].params.values())
    assert_same(runs[1], history[bad_step - 1], 0.0)  # untouched since its last finite step
    # Tiny leaves have a heavy tail of relative error over 12 steps, so the whole state is compared as one
    # vector.
    tol = COMPILED_TOL if compiled else EAGER_TOL
    for k in (0, 2):
        assert_same(runs[k], alone(params, members[k], batches_, base=SGD, make=optim.sgd)[0][-1], tol, whole=True)


def test_weights_overflowed_by_finite_gradients_freeze_the_member_one_step_late():
    """The freeze reads the loss and gradient norm, not the new weights (a second pass over the state): an
    infinite learning rate takes finite gradients to non-finite weights at step 1, whose loss and gradients
    were finite, so the member freezes at step 2, holding those weights; the others are unaffected."""
    params = init_params(CONFIG, 0)
    members = [SGD_MEMBERS[0], {"lr": math.inf, "weight_decay": 0.1}]
    states = sweep_states(params, optim.sgd(**SGD), members, ema=EMA)
    step = make_sweep_step(CONFIG, optim.sgd(**SGD), compile="off")
    frozen, batches_ = [], data(3)
    for batch in batches_:
        states, metrics = step(states, batch)
        frozen.append(metrics["frozen"].tolist())
    assert frozen == [[False, False], [False, True], [False, True]]
    runs = unstack_trees(states)
    assert int(runs[1].step) == 1 and not all(torch.isfinite(p).all() for p in runs[1].params.values())
    assert_same(runs[0], alone(params, members[0], batches_, base=SGD, make=optim.sgd)[0][-1], EAGER_TOL, whole=True)


def test_an_inplace_sweep_writes_the_pure_steps_values_into_its_input_states():
    tx = optim.adamw(lr=1e-3, weight_decay=0.1)
    states = sweep_states(init_params(CONFIG, 0), tx, [dict(lr=3e-3), dict(lr=1e-2)], ema=EMA)
    before = optree.tree_map(torch.clone, states)
    batch = data(1)[0]
    pure, _ = make_sweep_step(CONFIG, tx, compile="off")(states, batch)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(states), optree.tree_leaves(before)))
    written, _ = make_sweep_step(CONFIG, tx, inplace=True, compile="off")(states, batch)
    assert storage(written) == storage(states)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(states), optree.tree_leaves(pure)))
    assert not torch.equal(states.params["embed.weight"], before.params["embed.weight"])


def test_a_member_behind_the_others_stays_frozen_even_when_its_step_would_be_finite():
    tx = optim.sgd(**SGD)
    states = sweep_states(init_params(CONFIG, 0), tx, SGD_MEMBERS, ema=EMA)
    states = states._replace(step=torch.tensor([4, 3, 4]))  # member 1 froze at an earlier step
    new, metrics = make_sweep_step(CONFIG, tx, compile="off")(states, data(1)[0])
    assert metrics["frozen"].tolist() == [False, True, False] and metrics["loss"].isfinite().all()
    assert new.step.tolist() == [5, 3, 5]
    before, after = unstack_trees(states)[1], unstack_trees(new)[1]
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(before), optree.tree_leaves(after)))


def test_sweep_states_refuses_what_cannot_work():
    params = init_params(CONFIG, 0)
    with pytest.raises(ValueError, match="momentum"):  # SGD built without its momentum buffer
        sweep_states(params, optim.sgd(lr=0.1), [{"momentum": 0.9}, {"momentum": 0.5}])
    with pytest.raises(ValueError, match="one entry per member"):
        sweep_states([params, params], optim.sgd(lr=0.1), [{"lr": 0.1}] * 3)
    with pytest.raises(ValueError, match="every member"):
        sweep_states(params, optim.sgd(lr=0.1), [{"lr": 0.1}] * 2, ema=[0.9, 0.0])
    stacked = sweep_states(params, optim.sgd(lr=0.1), [{"lr": 0.1}, {"lr": 0.2}], seeds=[1, 2])
    assert stacked.params["embed.weight"].shape == (2, *params["embed.weight"].shape)
    assert stacked.rng[0] != stacked.rng[1] and stacked.ema == ()


def flash_calls(step, states, batch) -> int:
    """How many times one eager sweep step runs the CPU flash-attention kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(states, batch)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")


def test_a_cpu_sweep_runs_attention_in_the_math_form_when_its_weights_are_small():
    tx = optim.sgd(**SGD)
    states = sweep_states(init_params(CONFIG, 0), tx, SGD_MEMBERS)
    batch = data(1)[0]
    auto, flash = (make_sweep_step(CONFIG, tx, math_attention=m, compile="off") for m in (None, False))
    # vmap has no batching rule for the CPU flash kernel: it runs once per member, layer and micro-batch
    assert flash_calls(flash, states, batch) >= 3 * CONFIG.num_layers * 2
    assert flash_calls(auto, states, batch) == 0
    for a, b in zip(unstack_trees(auto(states, batch)[0]), unstack_trees(flash(states, batch)[0])):
        assert_same(a, b, 1e-5)
    long = torch.zeros(64, 4096, dtype=torch.long)  # 3 members x 64 x 4 heads x 4096^2 x 2 layers x 4 bytes: 103 GB
    assert not math_attention_pays(states, (long, long), CONFIG)


@pytest.mark.parametrize("kwargs,message", [
    (dict(reduction="Mean"), "reduction must be 'mean' or 'sum'"),  # was summed silently
    (dict(dropout_rates=[0.1, 1.5]), r"dropout_rate must be in \[0, 1\)"),  # was a scale of -2
    (dict(dropout_rates=[-0.1, 0.1]), r"dropout_rate must be in \[0, 1\)"),
])
def test_make_sweep_step_refuses_settings_the_step_would_misread(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sweep_step(CONFIG, optim.adamw(), compile="off", **kwargs)


def test_a_dropout_rate_per_member_is_checked_against_the_members():
    """Three rates for two members was a vmap error listing every leaf's size."""
    states = sweep_states(init_params(CONFIG, 0), optim.adamw(), [{"lr": 1e-3}, {"lr": 1e-2}])
    step = make_sweep_step(CONFIG, optim.adamw(), compile="off", dropout_rates=[0.1, 0.1, 0.1])
    x, y = data(1)[0]
    with pytest.raises(ValueError, match="3 dropout rates for a sweep of 2 members"):
        step(states, (x[0], y[0]))
