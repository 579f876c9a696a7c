"""Token ids to fixed-shape training batches, as generators.

Window k covers tokens k*stride .. k*stride+seq_len-1; its targets are the same span shifted by one.
Windows continue until every token after the first has been a target at least once; the last window
is padded past the end (inputs with pad_id, targets with ignore_index). Every batch is [B, T]: a
short last batch is topped up with fully ignored rows, or dropped with drop_last, so a compiled step
never meets a new shape. A position in the stream is (epoch, batch index), which checkpoints save.

The tokens may be an in-memory tensor, array or list, or a `minifn.corpus.TokenSequence` over shards
on disk: each row of a batch is read by slicing seq_len + 1 tokens, so nothing proportional to the
corpus is ever built (no window tensor, no int64 copy). The shuffled order is a keyed permutation
computed per index (`keyed_permutation`), so it needs no memory either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from minifn.corpus import TokenSequence
from minifn.losses import IGNORE_INDEX

MASK64 = (1 << 64) - 1
FEISTEL_ROUNDS = 4


def num_windows(num_tokens: int, seq_len: int, stride: int) -> int:
    """The fewest windows whose targets cover tokens 1 .. num_tokens-1."""
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to form an (input, target) pair, got {num_tokens}")
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be positive, got {seq_len} and {stride}")
    if stride > seq_len:
        raise ValueError(f"batch stride {stride} is larger than max seq len {seq_len}: "
                         "tokens between windows would never be trained on")
    return 1 + max(0, math.ceil((num_tokens - 1 - seq_len) / stride))


def windows(tokens: Sequence, seq_len: int, stride: int) -> Iterator[int]:
    """The start index of each window, in order."""
    yield from range(0, num_windows(len(tokens), seq_len, stride) * stride, stride)


def num_batches(num_tokens: int, seq_len: int, stride: int, batch_size: int, drop_last: bool = False) -> int:
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    n = num_windows(num_tokens, seq_len, stride)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ------------------------------------------------------------------------------------------ order


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays: a strong 64-bit bit mixer (wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _round_keys(key: int) -> list[np.uint64]:
    state = np.array([key & MASK64], dtype=np.uint64)
    keys = []
    for _ in range(FEISTEL_ROUNDS):
        state = _mix64(state + np.uint64(0x9E3779B97F4A7C15))
        keys.append(state[0])
    return keys


def keyed_permutation(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """π(positions) for a permutation π of range(n) chosen by key, computed per index in O(1) memory.

    A balanced Feistel network over the next power of four >= n is a bijection of its domain; values
    that land outside range(n) are encrypted again until they fall inside (cycle walking), which keeps
    a bijection of range(n). The domain is under 4n, so a value walks a few steps on average."""
    x = np.asarray(positions, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(key)

    def encrypt(v):
        left, right = v >> shift, v & low
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & low)
        return (left << shift) | right

    outside = np.ones(len(x), dtype=bool)
    while outside.any():
        x[outside] = encrypt(x[outside])
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


def epoch_key(seed: int, epoch: int) -> int:
    """The permutation key of (seed, epoch): distinct pairs give unrelated orders."""
    mixed = _mix64(np.array([(seed & MASK64)], dtype=np.uint64))[0]
    return int(_mix64(np.array([int(mixed) ^ (epoch & MASK64)], dtype=np.uint64))[0])


class WindowOrder:
    """Window indices for an epoch, in order or keyed by (seed, epoch); order[a:b] computes only those."""

    def __init__(self, num: int, epoch: int = 0, shuffle: bool = False, seed: int = 0):
        self.num, self.key = num, epoch_key(seed, epoch) if shuffle else None

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: slice) -> Tensor:
        start, stop, step = index.indices(self.num)
        positions = np.arange(start, stop, step, dtype=np.int64)
        if self.key is not None:
            positions = keyed_permutation(positions, self.num, self.key)
        return torch.from_numpy(positions)


def window_order(num: int, epoch: int, shuffle: bool, seed: int) -> WindowOrder:
    """Window indices for an epoch: in order, or a permutation keyed by (seed, epoch)."""
    return WindowOrder(num, epoch, shuffle, seed)


# ---------------------------------------------------------------------------------------- reading


def _as_tokens(tokens):
    """Tensors, numpy arrays and token sequences are sliced as they are; other sequences become a tensor."""
    if isinstance(tokens, Tensor):
        return tokens.reshape(-1)
    if isinstance(tokens, (np.ndarray, TokenSequence)):
        return tokens
    return torch.as_tensor(list(tokens), dtype=torch.long)


def read_span(tokens, start: int, stop: int) -> Tensor:
    """tokens[start:stop] as an int64 tensor (shorter past the end of the data)."""
    span = tokens[start:stop]
    if isinstance(span, Tensor):
        return span.long()
    return torch.from_numpy(np.asarray(span, dtype=np.int64))


def read_windows(tokens, starts, seq_len: int, batch_size: int, pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """[batch_size, seq_len] inputs and targets of the windows at starts, one slice each; rows past
    the data, and rows beyond len(starts), are padding whose targets are ignored."""
    x = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    y = torch.full((batch_size, seq_len), ignore_index, dtype=torch.long)
    for row, start in enumerate(starts):
        span = read_span(tokens, int(start), int(start) + seq_len + 1)
        x[row, : min(len(span), seq_len)] = span[:seq_len]
        y[row, : len(span) - 1] = span[1:]
    return x, y


def batches(tokens, seq_len: int, stride: int, batch_size: int, *, epoch: int = 0, start: int = 0,
            shuffle: bool = False, seed: int = 0, drop_last: bool = False, pad_id: int = 0,
            ignore_index: int = IGNORE_INDEX, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) long tensors [B, T] for one epoch, from batch index `start` on.

    With world_size > 1 every rank walks the same global batches of B * world_size windows and takes
    rows rank*B .. rank*B+B-1, so N ranks at batch B see exactly what one process at batch N*B sees."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if start < 0:  # a negative batch index would slice the order from its end: windows twice in one epoch
        raise ValueError(f"start is a batch index, at least 0, got {start}")
    tokens = _as_tokens(tokens)
    n = num_windows(len(tokens), seq_len, stride)
    order = window_order(n, epoch, shuffle, seed)
    global_batch = batch_size * world_size
    for b in range(start, num_batches(len(tokens), seq_len, stride, global_batch, drop_last)):
        first = b * global_batch + rank * batch_size
        rows = order[first : min(first + batch_size, (b + 1) * global_batch, n)] if first < n else []
        yield read_windows(tokens, [int(w) * stride for w in rows], seq_len, batch_size, pad_id, ignore_index)


def eval_batches(tokens, seq_len: int, stride: int, batch_size: int, pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows in order where every target is scored exactly once: window k > 0 ignores its first
    seq_len - stride targets, which window k - 1 already scored (with less context). Batches hold at most
    as many rows as there are windows: rows past them would only be padding (the scores do not change)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    tokens = _as_tokens(tokens)
    n = num_windows(len(tokens), seq_len, stride)
    batch_size = min(batch_size, n)
    for b in range(0, n, batch_size):
        ks = range(b, min(b + batch_size, n))
        x, y = read_windows(tokens, [k * stride for k in ks], seq_len, batch_size, pad_id, ignore_index)
        for row, k in enumerate(ks):
            if k > 0:
                y[row, : seq_len - stride] = ignore_index
        yield x, y
