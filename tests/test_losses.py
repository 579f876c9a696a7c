"""Losses against torch.nn.functional, with padding ignored."""

import math

import pytest
import torch
import torch.nn.functional as F

from minifn import losses

IGNORE = losses.IGNORE_INDEX


def random_batch(B=3, T=7, V=11, pad_from=5):
    logits = torch.randn(B, T, V, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[-1, pad_from:] = IGNORE
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_functional(reduction, smoothing):
    logits, targets = random_batch()
    got = losses.cross_entropy(logits, targets, reduction=reduction, label_smoothing=smoothing)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=smoothing)
    torch.testing.assert_close(got, want.view_as(got) if reduction == "none" else want)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logsumexp_form_has_functionals_values_and_gradients(smoothing):
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    logits, targets = random_batch(V=257)
    got = losses._reduce(losses.logsumexp_cross_entropy(logits, targets, smoothing), targets != IGNORE, "mean")
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, msg=f"seed {seed}")
    (grad,) = torch.autograd.grad(got, logits)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7, msg=f"seed {seed}")


def test_compiled_cross_entropy_traces_the_logsumexp_form():
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    logits, targets = random_batch()
    got = torch.compile(losses.cross_entropy, backend=record, fullgraph=True)(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(got, losses.cross_entropy(logits, targets, label_smoothing=0.1))
    ops = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.logsumexp in ops and F.cross_entropy not in ops


def _one_hot_reference(logits, targets, fn):
    valid = targets != IGNORE
    probs = logits.softmax(-1)[valid]
    return fn(probs, F.one_hot(targets[valid], logits.shape[-1]).float(), reduction="sum") / valid.sum()


@pytest.mark.parametrize("ours,fn", [(losses.mse, F.mse_loss), (losses.mae, F.l1_loss)])
def test_mse_mae_are_distances_to_one_hot(ours, fn):
    logits, targets = random_batch()
    got = ours(logits, targets)
    torch.testing.assert_close(got, _one_hot_reference(logits, targets, fn))
    (grad,) = torch.autograd.grad(got, logits)
    assert torch.isfinite(grad).all()
    assert grad[-1, 5:].abs().sum() == 0  # padded positions get no gradient


@pytest.mark.parametrize("loss", list(losses.LOSSES.values()))
def test_padding_never_counts(loss):
    logits, targets = random_batch()
    changed = logits.detach().clone()
    changed[-1, 5:] += 100 * torch.randn_like(changed[-1, 5:])
    torch.testing.assert_close(loss(logits, targets), loss(changed, targets))


def test_perplexity_of_a_uniform_guess_is_the_vocabulary_size():
    V = int(torch.randint(2, 1000, ()))
    logits, targets = torch.zeros(2, 5, V), torch.randint(0, V, (2, 5))
    assert losses.perplexity(losses.cross_entropy(logits, targets).item()) == pytest.approx(V, rel=1e-5)
    assert losses.perplexity(float("inf")) == math.exp(700)  # a diverged loss prints, it does not overflow


@pytest.mark.parametrize("loss", [losses.cross_entropy, losses.mse, losses.mae])
def test_an_unknown_reduction_is_refused(loss):
    """Any name other than 'none' or 'sum' used to mean 'mean', silently."""
    logits, targets = random_batch()
    with pytest.raises(ValueError, match="reduction must be 'none', 'sum' or 'mean'"):
        loss(logits, targets, reduction="avg")
