"""Explicit randomness, JAX-style: a key is a 0-D int64 tensor holding 32 bits, new keys come from
`fold_in(key, data)`, and random draws are hashes of (key, index). Everything is a pure function of its
inputs, so a run with dropout is bit-identical eager or compiled and resumes exactly."""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (works on ints and int64 tensors; products stay below 2**59, so no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def key(seed: int, device=None) -> Tensor:
    """A fresh key from an integer seed."""
    return torch.tensor(seed & _M32, dtype=torch.int64, device=device)


def fold_in(key: Tensor, data) -> Tensor:
    """A new 32-bit key from a key and an integer (a step, a layer, a rank), as jax.random.fold_in."""
    return _mix32(key ^ _mix32(data & _M32))


def dropout(x: Tensor, rate: float | Tensor, key: Tensor | None) -> Tensor:
    """Inverted dropout whose mask is a hash of (key, element index). Identity without a key.

    rate may be a 0-D float64 tensor (one per member of a vmapped sweep): the same mask as the float."""
    if key is None or (not isinstance(rate, Tensor) and rate == 0.0):
        return x
    index = torch.arange(x.numel(), device=x.device).view(x.shape)
    threshold = (rate * 2**32).to(torch.int64) if isinstance(rate, Tensor) else int(rate * 2**32)
    keep = _mix32(index ^ _mix32(key)) >= threshold
    return x * keep / (1.0 - rate)
