"""Ensembles: K models trained in one vmapped step equal K models trained one by one."""

import functools

import optree
import pytest
import torch

from conftest import relative_error, tiny_config
from minifn import optim, stack_trees, trees, unstack_trees
from minifn.data import batches
from minifn.model import init_params
from minifn.step import init_state, train_step

CONFIG = tiny_config()


def test_stack_and_unstack_are_inverse():
    trees = [init_params(CONFIG, s) for s in range(3)]
    stacked = stack_trees(trees)
    assert stacked["embed.weight"].shape == (3, *trees[0]["embed.weight"].shape)
    for a, b in zip(unstack_trees(stacked), trees):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_leaves_and_rebuild_are_optrees_eager_and_compiled():
    """Compiled, they go through tree_map (fast for dynamo to trace); the leaves, their order and the
    rebuilt structure must be optree's all the same: dict keys sorted, NamedTuples, () and None."""
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr=1e-3))
    params = {"b": torch.randn(2), "a": torch.randn(3), "c": torch.randn(1)}
    tree = (init_state(params, tx)._replace(ema=()), None, [torch.randn(2)])

    def plus_index(t):
        return trees.rebuild(t, [x + i for i, x in enumerate(trees.leaves(t))])

    expected = optree.tree_unflatten(optree.tree_structure(tree),
                                     [x + i for i, x in enumerate(optree.tree_leaves(tree))])
    for fn in (plus_index, torch.compile(plus_index, backend="eager", fullgraph=True)):
        out = fn(tree)
        assert optree.tree_structure(out) == optree.tree_structure(tree)
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(out), optree.tree_leaves(expected),
                                                      strict=True))
    mixed_keys = {1: torch.ones(1), "a": torch.zeros(1)}  # optree's order for keys it cannot sort
    compiled = torch.compile(lambda t: trees.leaves(t), backend="eager", fullgraph=True)
    assert [x.item() for x in compiled(mixed_keys)] == [x.item() for x in optree.tree_leaves(mixed_keys)]
    for wrong in (lambda ls: ls[1:], lambda ls: [*ls, ls[0]]):
        mismatched = torch.compile(lambda t, wrong=wrong: trees.rebuild(t, wrong(trees.leaves(t))), backend="eager",
                                   fullgraph=True)
        with pytest.raises(Exception, match="fewer leaves than the tree has|21 leaves for a tree of 20"):
            mismatched(tree)


def test_replace_equals_namedtuple_replace_eager_and_on_a_tuple_made_in_the_graph():
    state = init_state({"w": torch.randn(3)}, optim.sgd(lr=0.1))

    def bump(s):
        rebuilt = trees.rebuild(s, trees.leaves(s))  # made in the graph, as compiled steps' states are
        return trees.replace(rebuilt, step=rebuilt.step + 1)

    for fn in (bump, torch.compile(bump, backend="eager", fullgraph=True)):
        out = fn(state)
        assert type(out) is type(state) and out._fields == state._fields
        expected = state._replace(step=state.step + 1)
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(out), optree.tree_leaves(expected),
                                                      strict=True))


# A member alone is differentiated by torch.autograd (eager, outermost: see step._grad_and_value) and the
# vmapped ensemble by functorch; compiled, inductor also sums in another order. Either way the gradients
# differ at float level, and Adam's first steps are about lr * sign(g), so near-zero gradients whose sign
# that noise flips move by a whole lr (heavy-tailed per leaf, up to 2e-4 seen on a tiny leaf). So eager
# AdamW is compared over the whole state as one vector (within 3e-5, as in test_sweep). SGD is linear in the
# gradient and keeps the noise at float level (2e-7 measured), so it is what makes the compiled check tight.
@pytest.mark.parametrize("compiled,tx", [
    (False, optim.adamw(lr=1e-2, weight_decay=0.1)),
    pytest.param(True, optim.sgd(lr=0.5, momentum=0.9, weight_decay=0.1), marks=pytest.mark.slow),
], ids=["eager-adamw", "compiled-sgd"])
def test_vmapped_ensemble_equals_each_member_trained_alone(compiled, tx):
    K = 3
    members = [init_state(init_params(CONFIG, seed), tx) for seed in range(K)]
    data = [list(batches(torch.randint(0, CONFIG.vocab_size, (200,)), 16, 8, 4)) for _ in range(K)]
    step = torch.func.vmap(functools.partial(train_step, config=CONFIG, optimizer=tx))
    if compiled:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    ensemble = stack_trees(members)
    for i in range(4):
        xs = torch.stack([data[k][i][0] for k in range(K)])
        ys = torch.stack([data[k][i][1] for k in range(K)])
        ensemble, metrics = step(ensemble, (xs, ys))
        members = [train_step(members[k], data[k][i], config=CONFIG, optimizer=tx)[0] for k in range(K)]
    assert metrics["loss"].shape == (K,)
    for alone, together in zip(members, unstack_trees(ensemble)):
        pairs = list(zip(optree.tree_leaves(together), optree.tree_leaves(alone), strict=True))
        assert all(torch.equal(a, b) for a, b in pairs if not a.is_floating_point())
        floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        groups = [([a], [b]) for a, b in floats] if compiled else [tuple(zip(*floats))]  # AdamW: as one vector
        for a, b in groups:
            assert relative_error(a, b) < (1e-5 if compiled else 3e-5)


def test_the_key_order_is_marked_as_dynamo_marks_a_constant_result():
    """trees marks _key_order as torch._dynamo.assume_constant_result would (without importing dynamo): a torch
    that marks another way would trace it per key again, correct but slow."""
    marked = torch._dynamo.assume_constant_result(lambda: None)
    assert set(vars(marked)) == {"_dynamo_marked_constant"}
    assert trees._key_order._dynamo_marked_constant is marked._dynamo_marked_constant


def test_importing_minifn_does_not_import_dynamo():
    import subprocess
    import sys

    code = "import sys, minifn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
