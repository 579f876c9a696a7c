"""Token ids to fixed-shape training batches, as generators.

Window k covers tokens k*stride .. k*stride+seq_len-1; its targets are the same span shifted by one.
Windows continue until every token after the first has been a target at least once; the last window
is padded past the end (inputs with pad_id, targets with ignore_index). Every batch is [B, T]: a
short last batch is topped up with fully ignored rows, or dropped with drop_last, so a compiled step
never meets a new shape. A position in the stream is (epoch, batch index), which checkpoints save.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from minifn.losses import IGNORE_INDEX


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


def window_tensors(tokens, seq_len: int, stride: int, pad_id: int = 0,
                   ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """All windows at once as [num_windows, T] inputs and targets: strided views of two padded copies."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = num_windows(len(tokens), seq_len, stride)
    length = (n - 1) * stride + seq_len
    inputs = torch.full((length,), pad_id, dtype=torch.long)
    targets = torch.full((length,), ignore_index, dtype=torch.long)
    inputs[: min(length, len(tokens))] = tokens[:length]
    targets[: min(length, len(tokens) - 1)] = tokens[1 : length + 1]
    return inputs.unfold(0, seq_len, stride), targets.unfold(0, seq_len, stride)


def _top_up(x: Tensor, y: Tensor, batch_size: int, pad_id: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Fill a short batch to batch_size rows with padding whose targets the loss ignores."""
    fill = batch_size - len(x)
    if fill <= 0:
        return x, y
    return (torch.cat([x, torch.full((fill, x.shape[1]), pad_id, dtype=torch.long)]),
            torch.cat([y, torch.full((fill, y.shape[1]), ignore_index, dtype=torch.long)]))


def window_order(num: int, epoch: int, shuffle: bool, seed: int) -> Tensor:
    """Window indices for an epoch: in order, or a permutation keyed by (seed, epoch)."""
    if not shuffle:
        return torch.arange(num)
    generator = torch.Generator().manual_seed((seed << 20) ^ epoch)
    return torch.randperm(num, generator=generator)


def batches(tokens, seq_len: int, stride: int, batch_size: int, *, epoch: int = 0, start: int = 0,
            shuffle: bool = False, seed: int = 0, drop_last: bool = False, pad_id: int = 0,
            ignore_index: int = IGNORE_INDEX, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) long tensors [B, T] for one epoch, from batch index `start` on.

    With world_size > 1 every rank walks the same global batches of B * world_size windows and takes
    rows rank*B .. rank*B+B-1, so N ranks at batch B see exactly what one process at batch N*B sees."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    inputs, targets = window_tensors(tokens, seq_len, stride, pad_id, ignore_index)
    order = window_order(len(inputs), epoch, shuffle, seed)
    global_batch = batch_size * world_size
    for b in range(start, num_batches(len(tokens), seq_len, stride, global_batch, drop_last)):
        rows = order[b * global_batch : (b + 1) * global_batch][rank * batch_size : (rank + 1) * batch_size]
        yield _top_up(inputs[rows], targets[rows], batch_size, pad_id, ignore_index)


def eval_batches(tokens, seq_len: int, stride: int, batch_size: int, pad_id: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows in order where every target is scored exactly once: window k > 0 ignores its first
    seq_len - stride targets, which window k - 1 already scored (with less context)."""
    inputs, targets = window_tensors(tokens, seq_len, stride, pad_id, ignore_index)
    targets = targets.clone()
    targets[1:, : seq_len - stride] = ignore_index
    for b in range(0, len(inputs), batch_size):
        yield _top_up(inputs[b : b + batch_size], targets[b : b + batch_size], batch_size, pad_id, ignore_index)
