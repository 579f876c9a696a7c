"""The gradient noise scale: the estimator against a known answer, the step's metrics against the estimator
applied to its own micro-batch gradients, and the logged, plotted values of a CLI run."""

import json
import re

import optree
import pytest
import torch

from conftest import TINY_FLAGS, invoke, story_file, tiny_config
from minifn import checkpoint, noise, optim
from minifn.data import batches
from minifn.losses import IGNORE_INDEX
from minifn.model import init_params
from minifn.step import apply_gradients, init_state, loss_and_grads, train_step

CONFIG = tiny_config()


def estimate(per_example: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(|G|^2, tr Sigma) from per-example gradients [..., N, D] cut into micro-batches of the given sizes."""
    small = sum(noise.small_batch_sums(g.sum(-2).norm(dim=-1), torch.tensor(g.shape[-2]))
                for g in per_example.split(sizes, dim=-2))
    big_sq = per_example.mean(-2).square().sum(-1).double()
    return noise.moments(small, big_sq, torch.tensor(per_example.shape[-2]))


@pytest.mark.parametrize("sizes", [[4] * 8, [2, 6, 0, 5, 3, 4, 7]], ids=["equal", "unequal-and-empty"])
def test_estimator_recovers_a_known_noise_scale(sizes):
    """g_i = G + L z_i has |G|^2 and tr(Sigma) = |L|_F^2 set by construction; B_simple is their ratio."""
    dim, draws = 40, 3000
    G = torch.randn(dim, dtype=torch.float64) * 0.3
    L = torch.randn(dim, dim, dtype=torch.float64) / dim**0.5 * torch.linspace(0.2, 2.0, dim, dtype=torch.float64)
    true_g2, true_trace = G.square().sum(), L.square().sum()
    per_example = G + torch.randn(draws, sum(sizes), dim, dtype=torch.float64) @ L.T  # [draws, N, D]
    g2s, traces = estimate(per_example, sizes)
    # each estimate is unbiased; their means over the draws are within a few standard errors of the truth
    assert abs(g2s.mean() - true_g2) < 4 * g2s.std() / draws**0.5 + 1e-3 * true_g2
    assert abs(traces.mean() - true_trace) < 4 * traces.std() / draws**0.5 + 1e-3 * true_trace
    b_simple, true_b = traces.mean() / g2s.mean(), true_trace / true_g2
    assert abs(b_simple / true_b - 1) < 0.05, (b_simple, true_b)


def test_equal_micro_batches_give_the_papers_formulas():
    per_example = torch.randn(12, 7, dtype=torch.float64) + 0.5
    g2, trace = estimate(per_example, [3, 3, 3, 3])
    small = (per_example.view(4, 3, 7).mean(1).square().sum(-1)).mean()  # |G_small|^2 averaged
    big = per_example.mean(0).square().sum()
    torch.testing.assert_close(g2, (12 * big - 3 * small) / (12 - 3))
    torch.testing.assert_close(trace, (small - big) / (1 / 3 - 1 / 12))


def test_one_micro_batch_gives_no_estimate():
    g2, trace = estimate(torch.randn(5, 3), [5])
    assert g2.isnan() and trace.isnan()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_metrics_are_the_estimator_on_its_own_micro_batch_gradients(reduction):
    tx = optim.sgd(lr=0.1)
    state = init_state(init_params(CONFIG, 0), tx)
    x, y = next(batches(torch.randint(0, CONFIG.vocab_size, (400,)), 16, 4, 12))
    y[2:4, 5:] = IGNORE_INDEX  # micro-batches of unequal target counts
    y[8:12] = IGNORE_INDEX  # and one with none, which is left out
    xs, ys = x.view(3, 4, 16), y.view(3, 4, 16)
    _, metrics = train_step(state, (xs, ys), config=CONFIG, optimizer=tx, reduction=reduction, log_gns=True)
    # by hand: per micro-batch mean gradients G_a over n_a targets, the big one over all N
    small_sq, inv_n, total, count = [], [], None, 0
    for a in range(3):
        grads, _, n, _ = loss_and_grads(state.params, (xs[a], ys[a]), config=CONFIG)
        flat = torch.cat([g.flatten() for g in grads.values()]).double()
        total = flat if total is None else total + flat
        count += int(n)
        if n:
            small_sq.append((flat / n).square().sum())
            inv_n.append(1 / n)
    big_sq = (total / count).square().sum()
    trace = (sum(small_sq) / 2 - big_sq) / (sum(inv_n) / 2 - 1 / count)
    torch.testing.assert_close(metrics["gns_trace"], trace, rtol=1e-4, atol=0)
    # |G|^2 is a difference of two near-equal terms (a thousandfold cancellation is common at this size), so its
    # float32 rounding is relative to the terms, not to the difference; a wrong count would move it by ~1e-2 of them
    torch.testing.assert_close(metrics["gns_g2"], big_sq - trace / count, rtol=1e-4, atol=1e-5 * big_sq.item())
    _, plain = train_step(state, (xs, ys), config=CONFIG, optimizer=tx)
    assert "gns_g2" not in plain


def test_data_parallel_sums_give_the_same_estimate_as_one_process():
    """Two ranks of one micro-batch each, summed as the all-reduce does, equal one process with both."""
    tx = optim.sgd(lr=0.1)
    state = init_state(init_params(CONFIG, 0), tx)
    x, y = next(batches(torch.randint(0, CONFIG.vocab_size, (400,)), 16, 4, 8))
    per_rank = [loss_and_grads(state.params, (x[r::2], y[r::2]), config=CONFIG, log_gns=True) for r in range(2)]
    summed = [optree.tree_map(torch.add, *parts) for parts in zip(*per_rank)]  # grads, loss, tokens, small
    _, reduced = apply_gradients(state, *summed, optimizer=tx)
    _, one = train_step(state, (torch.stack([x[0::2], x[1::2]]), torch.stack([y[0::2], y[1::2]])), config=CONFIG,
                        optimizer=tx, log_gns=True)
    for name in noise.METRICS:
        torch.testing.assert_close(reduced[name], one[name], rtol=1e-6, atol=0)
    assert one["gns_trace"].isfinite() and one["gns_trace"] != 0


def test_log_fields_smooth_the_ratio_and_skip_undefined_steps():
    s = noise.Smoothed()
    s, fields = noise.log_fields(s, 2.0, 200.0)
    assert fields == {"gns_g2": 2.0, "gns_trace": 200.0, "gns": pytest.approx(100.0)}
    s, fields = noise.log_fields(s, float("nan"), float("nan"))
    assert fields["gns_g2"] is None and fields["gns"] == pytest.approx(100.0)
    s, fields = noise.log_fields(s, 1.0, 300.0)
    assert 100.0 < fields["gns"] < 300.0
    assert noise.log_fields(s) == (s, {})


@pytest.fixture
def story(tmp_path):
    return story_file(tmp_path, 800)


def test_cli_logs_and_plots_the_noise_scale_and_refuses_one_micro_batch(story, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt = tmp_path / "mini.pt"
    base = ["train", "--dataset", story, "--model", ckpt, *TINY_FLAGS, "--num-epochs", 3, "--log-gns"]
    refused = invoke(*base)
    assert refused.exit_code == 1 and "--log-gns" in refused.output and "--grad-accum-steps" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    result = invoke(*base, "--grad-accum-steps", 2)
    assert result.exit_code == 0, result.output
    steps = [e for e in map(json.loads, checkpoint.metrics_path(ckpt).read_text().splitlines()) if e["kind"] == "step"]
    assert all({"gns_g2", "gns_trace", "gns"} <= set(e) for e in steps)
    assert sum(e["gns"] is not None for e in steps) >= len(steps) // 2
    plotted = invoke("plot", checkpoint.metrics_path(ckpt), "-o", tmp_path / "loss.png")
    assert plotted.exit_code == 0 and (tmp_path / "loss.png").stat().st_size > 0, plotted.output


@pytest.mark.parametrize("shape", [(4, 16), (1, 4, 16)], ids=["no micro-batches", "one"])
def test_the_made_steps_refuse_log_gns_without_two_micro_batches(shape):
    """One micro-batch would make every estimate NaN: the factories' steps say so before stepping."""
    from minifn.step import make_train_step
    from minifn.sweep import make_sweep_step, sweep_states

    tx = optim.sgd(lr=0.1)
    x, y = next(batches(torch.randint(0, CONFIG.vocab_size, (400,)), 16, 4, 8))
    state = init_state(init_params(CONFIG, 0), tx)
    step = make_train_step(CONFIG, tx, log_gns=True, compile="off")
    refused = r"needs a batch \[A, B, T\] of A >= 2 micro-batches, got " + re.escape(str(shape))
    with pytest.raises(ValueError, match=refused):
        step(state, (x[:4].view(shape), y[:4].view(shape)))
    _, metrics = step(state, (x.view(2, 4, 16), y.view(2, 4, 16)))
    assert metrics["gns_trace"].isfinite() and metrics["gns_g2"].isfinite()
    states = sweep_states(init_params(CONFIG, 0), tx, [{"lr": 0.1}, {"lr": 0.2}])
    with pytest.raises(ValueError, match="needs a batch"):
        make_sweep_step(CONFIG, tx, log_gns=True, compile="off")(states, (x[:4].view(shape), y[:4].view(shape)))
