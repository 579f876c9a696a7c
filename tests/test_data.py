"""The strided batcher: window arithmetic against brute force, padding, shapes, shuffling, resume."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minifn.data import batches, eval_batches, keyed_permutation, num_batches, num_windows, window_order, windows
from minifn.losses import IGNORE_INDEX


def brute_force_starts(n, T, S):
    """Add windows one by one until the last target position n-1 is covered."""
    starts = [0]
    while starts[-1] + T < n - 1:
        starts.append(starts[-1] + S)
    return starts


def test_tutorial_example():
    starts = list(windows(range(807), 128, 8))
    assert [(s + 1, s + 128) for s in starts[:3]] == [(1, 128), (9, 136), (17, 144)]  # 1-based, as in the tutorial
    assert starts[-1] + 128 >= 806 and starts[-2] + 128 < 806


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 400), T=st.integers(1, 64), S=st.integers(1, 64))
def test_window_counts_match_brute_force(n, T, S):
    if S > T:
        with pytest.raises(ValueError, match="never be trained on"):
            num_windows(n, T, S)
        return
    assert list(windows(range(n), T, S)) == brute_force_starts(n, T, S)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 200), T=st.integers(1, 32), S=st.integers(1, 32), B=st.integers(1, 5),
       shuffle=st.booleans())
def test_every_target_covered_padding_ignored_shapes_fixed(n, T, S, B, shuffle):
    S = min(S, T)
    tokens = torch.randint(3, 1000, (n,))
    seen = torch.zeros(n, dtype=torch.bool)
    count = 0
    for x, y in batches(tokens, T, S, B, shuffle=shuffle, seed=1, pad_id=0):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        for row_x, row_y in zip(x, y):
            if (row_y == IGNORE_INDEX).all():
                continue  # a filler row
            real = row_y != IGNORE_INDEX
            assert (row_x[~real][1:] == 0).all()  # inputs past the data are the pad id
            assert real.cummin(0).values.equal(real)  # real targets form a prefix; padding only at the end
        count += 1
    assert count == num_batches(n, T, S, B)
    # coverage, checked on positions: window k's targets are tokens kS+1 .. kS+T
    for s in windows(range(n), T, S):
        seen[s + 1 : s + T + 1] = True
    assert seen[1:].all()


def test_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(10, 50)
    x, y = next(batches(tokens, 8, 4, 3))
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[1], tokens[4:12]) and torch.equal(y[1], tokens[5:13])


def test_short_data_is_one_padded_window():
    (x, y), = list(batches([5, 6, 7], 6, 2, 1, pad_id=9))
    assert x.tolist() == [[5, 6, 7, 9, 9, 9]]
    assert y.tolist() == [[6, 7] + [IGNORE_INDEX] * 4]


def test_last_batch_topped_up_or_dropped():
    tokens = torch.arange(100)
    n = num_windows(100, 10, 10)  # 10 windows
    full = list(batches(tokens, 10, 10, 4))
    assert len(full) == 3 and (full[-1][1][2:] == IGNORE_INDEX).all()
    assert len(list(batches(tokens, 10, 10, 4, drop_last=True))) == n // 4


def test_shuffle_is_deterministic_per_seed_and_differs_across_epochs():
    tokens = torch.arange(500)

    def epoch(e, seed=0):
        return torch.cat([x for x, _ in batches(tokens, 16, 8, 4, epoch=e, shuffle=True, seed=seed)])

    assert torch.equal(epoch(0), epoch(0))
    assert not torch.equal(epoch(0), epoch(1))
    assert not torch.equal(epoch(0), epoch(0, seed=1))
    assert sorted(epoch(3)[:, 0].tolist()) == sorted(epoch(0)[:, 0].tolist())  # same windows, new order


def test_resume_from_position_yields_the_identical_rest():
    tokens = torch.randint(0, 100, (300,))
    everything = list(batches(tokens, 16, 4, 5, epoch=2, shuffle=True, seed=7))
    rest = list(batches(tokens, 16, 4, 5, epoch=2, start=6, shuffle=True, seed=7))
    assert len(rest) == len(everything) - 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(everything[6:], rest))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        list(batches([1], 4, 2, 1))


def test_a_negative_start_or_an_empty_eval_batch_is_refused():
    """start=-2 sliced the order from its end (windows twice in one epoch); an eval batch size of 0 was a
    range() error."""
    tokens = torch.randint(0, 50, (50,))
    with pytest.raises(ValueError, match="start is a batch index"):
        list(batches(tokens, 8, 4, 2, start=-2))
    with pytest.raises(ValueError, match="batch size must be positive"):
        list(eval_batches(tokens, 8, 4, 0))


# ------------------------------------------------------------------ the keyed per-index permutation


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), key=st.integers(0, 2**64 - 1))
def test_keyed_permutation_is_a_permutation(n, key):
    assert sorted(keyed_permutation(np.arange(n), n, key).tolist()) == list(range(n))


def test_keyed_permutation_per_index_is_the_whole_permutation_and_looks_random(recorded_seed):
    n, key = 1000, recorded_seed
    whole = keyed_permutation(np.arange(n), n, key)
    picked = np.random.default_rng(recorded_seed).choice(n, 50, replace=False)
    assert np.array_equal(keyed_permutation(picked, n, key), whole[picked])  # any index alone, same answer
    assert (whole == np.arange(n)).sum() < 20 and abs(np.corrcoef(whole, np.arange(n))[0, 1]) < 0.2


def test_window_order_is_deterministic_per_seed_and_epoch_and_needs_no_table():
    order = window_order(10**12, epoch=3, shuffle=True, seed=5)  # a permutation of 10^12 indices, computed per index
    first = order[0:1000]
    assert len(set(first.tolist())) == 1000 and int(first.max()) < 10**12
    assert torch.equal(first, window_order(10**12, 3, True, 5)[0:1000])
    assert not torch.equal(first, window_order(10**12, 4, True, 5)[0:1000])
    assert not torch.equal(first, window_order(10**12, 3, True, 6)[0:1000])
    assert window_order(7, 0, False, 0)[0:7].tolist() == list(range(7))


def reference_batches(tokens, T, S, B, order, pad_id, ignore=IGNORE_INDEX):
    """The original whole-corpus implementation: every window as a padded, unfolded tensor, rows gathered."""
    n = num_windows(len(tokens), T, S)
    length = (n - 1) * S + T
    inputs = torch.full((length,), pad_id, dtype=torch.long)
    targets = torch.full((length,), ignore, dtype=torch.long)
    inputs[: min(length, len(tokens))] = tokens[:length]
    targets[: min(length, len(tokens) - 1)] = tokens[1 : length + 1]
    inputs, targets = inputs.unfold(0, T, S), targets.unfold(0, T, S)
    for b in range(0, n, B):
        rows = order[b : b + B]
        x, y = inputs[rows], targets[rows]
        fill = B - len(rows)
        yield (torch.cat([x, torch.full((fill, T), pad_id, dtype=torch.long)]),
               torch.cat([y, torch.full((fill, T), ignore, dtype=torch.long)]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 120), T=st.integers(1, 16), S=st.integers(1, 16), B=st.integers(1, 4), shuffle=st.booleans(),
       epoch=st.integers(0, 3), world=st.integers(1, 3), data=st.data())
def test_sliced_batches_equal_the_original_window_tensors(n, T, S, B, shuffle, epoch, world, data):
    S, rank = min(S, T), data.draw(st.integers(0, world - 1))
    tokens = torch.arange(100, 100 + n)
    order = window_order(num_windows(n, T, S), epoch, shuffle, 7)[:]
    expected = [(x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B])  # this rank's rows of each global batch
                for x, y in reference_batches(tokens, T, S, B * world, order, pad_id=1)]
    kw = dict(epoch=epoch, shuffle=shuffle, seed=7, pad_id=1, rank=rank, world_size=world)
    got = list(batches(tokens, T, S, B, **kw))
    assert len(got) == len(expected)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, expected))
    as_numpy = list(batches(tokens.numpy().astype(np.uint16), T, S, B, **kw))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(as_numpy, expected))


def test_eval_batches_score_every_target_once():
    tokens = torch.arange(1, 60)
    scored = torch.cat([y[y != IGNORE_INDEX] for _, y in eval_batches(tokens, 8, 3, 4)])
    assert scored.tolist() == tokens[1:].tolist()
