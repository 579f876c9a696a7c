"""Stateless optimizers against torch.optim: same gradients in, same parameters out."""

import optree
import pytest
import torch

from minifn import optim


def mlp_problem(seed):
    g = torch.Generator().manual_seed(seed)
    params = {"w1": torch.randn(8, 16, generator=g) * 0.5, "b1": torch.randn(16, generator=g) * 0.1,
              "w2": torch.randn(16, 4, generator=g) * 0.5}
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)

    def loss(p):
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    return params, loss


def quadratic_problem(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 10, generator=g)
    h, target = a @ a.T / 10 + torch.eye(10), torch.randn(10, generator=g)
    return {"x": torch.randn(10, generator=g)}, lambda p: 0.5 * (p["x"] - target) @ h @ (p["x"] - target)


CASES = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.05, momentum=0.5, weight_decay=0.1)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, amsgrad=True)),
    ("adam", dict(lr=0.01, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)),
    ("adamw", dict(lr=0.01)),
    ("adamw", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize("problem", [mlp_problem, quadratic_problem])
@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_torch_optim(problem, name, kwargs):
    seed = torch.seed() % 2**31
    params, loss_fn = problem(seed)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](
        list(ref.values()), **kwargs)
    tx = getattr(optim, name)(**kwargs)
    state = tx.init(params)
    for _ in range(100):
        torch_opt.zero_grad()
        loss_fn(ref).backward()
        grads = {k: v.grad.clone() for k, v in ref.items()}  # the same gradients feed both
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        torch_opt.step()
    for k in params:  # relative error of each tensor; single coordinates near zero carry O(ulp) noise
        error = ((params[k] - ref[k].detach()).norm() / ref[k].detach().norm()).item()
        assert error < 1e-6, f"{name} {kwargs} {k}: relative error {error:.2e}"
    start = problem(seed)[0]
    assert all(not torch.equal(params[k], start[k]) for k in params)  # the comparison is not vacuous


def test_clip_by_global_norm_matches_torch():
    grads = {"a": torch.randn(5, 3) * 10, "b": torch.randn(7) * 10}
    ref = [g.clone() for g in grads.values()]
    params = [torch.zeros_like(g, requires_grad=True) for g in ref]
    for p, g in zip(params, ref):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.5)
    tx = optim.clip_by_global_norm(1.5)
    clipped, _ = tx.update(grads, tx.init(grads))
    for c, p in zip(clipped.values(), params):
        torch.testing.assert_close(c, p.grad, rtol=1e-6, atol=0)
    small = {"a": torch.full((3,), 1e-3)}
    assert torch.equal(tx.update(small, tx.init(small))[0]["a"], small["a"])  # under the norm: untouched


def test_in_place_apply_is_bit_identical():
    params, loss_fn = mlp_problem(torch.seed() % 2**31)
    tx = optim.adamw(lr=0.01, weight_decay=0.1)
    p_out, s_out = params, tx.init(params)
    p_in, s_in = optree.tree_map(torch.clone, params), tx.init(params)
    p_in_ids = [id(t) for t in optree.tree_leaves(p_in)]
    for _ in range(10):
        grads = torch.func.grad(loss_fn)(p_out)
        updates, s_next = tx.update(grads, s_out, p_out)
        p_out, s_out = optim.apply_updates(p_out, updates), s_next
        updates, s_next = tx.update(grads, s_in, p_in)
        optim.assign_(p_in, optim.apply_updates(p_in, updates))
        optim.assign_(s_in, s_next)
    assert [id(t) for t in optree.tree_leaves(p_in)] == p_in_ids
    for a, b in zip(optree.tree_leaves((p_out, s_out)), optree.tree_leaves((p_in, s_in))):
        assert torch.equal(a, b)


def test_set_hyperparams_changes_the_rate_and_rejects_unknown_names():
    params = {"x": torch.ones(3)}
    tx = optim.sgd(lr=0.1)
    state = optim.set_hyperparams(tx.init(params), lr=0.5)
    updates, _ = tx.update({"x": torch.ones(3)}, state, params)
    torch.testing.assert_close(updates["x"], torch.full((3,), -0.5))
    with pytest.raises(ValueError, match="no hyperparameter named momentum"):
        optim.set_hyperparams(state, momentum=0.9)


@pytest.mark.slow
def test_compiled_update_does_not_recompile_for_new_lr_or_step():
    from torch._dynamo.utils import counters

    params, loss_fn = mlp_problem(0)
    tx = optim.adamw(lr=1e-3, weight_decay=0.01)

    def step(params, state):
        grads = torch.func.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    state = tx.init(params)
    for lr in (1e-3, 2e-3, 5e-4, 1e-2, 3e-3):
        state = optim.set_hyperparams(state, lr=lr)
        for _ in range(4):
            params, state = compiled(params, state)
    assert counters["stats"]["unique_graphs"] == 1
    assert int(state[0].count) == 20
