"""The strided batcher: window arithmetic against brute force, padding, shapes, shuffling, resume."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minifn.data import batches, num_batches, num_windows, windows
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
