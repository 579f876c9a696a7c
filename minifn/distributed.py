"""Data parallelism on torch.distributed: process group, gradient all-reduce, agreement between ranks.

Launched by `torchrun --nproc-per-node N -m minifn train ...` (or `minifn train --nproc N`): gloo on
CPU, NCCL on CUDA. Every rank starts from rank 0's parameters, reads its own rows of each global batch
(minifn.data.batches with rank/world_size), and sums gradients across ranks once per optimizer step,
packed into a few flat buffers. Single-process runs never import this module.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import optree
import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 32 << 20


class PeerLost(RuntimeError):
    """Another rank died or cannot be reached; the last checkpoint is intact."""


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched() -> bool:
    """True inside a process started by torchrun (or anything that sets the same environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_s: float = 120.0) -> World:
    """Join the process group torchrun described; CUDA ranks take the GPU of their local rank."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, device)


def shutdown(wait: bool = False) -> None:
    """Leave the process group; wait=True first waits for every rank, so none tears its connections down
    while a peer still uses them (gloo aborts the peer then)."""
    if dist.is_initialized():
        if wait:
            _collective(dist.barrier)
        dist.destroy_process_group()


def _buckets(tensors: list[Tensor], bucket_bytes: int):
    """Consecutive groups of tensors of at most bucket_bytes each (a larger tensor goes alone)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def all_reduce_sum_(tensors: list[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum tensors across ranks in place, a few large collectives instead of one per tensor."""
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        for bucket in _buckets(group, bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            _collective(dist.all_reduce, flat)
            for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(chunk.view_as(t))


def _collective(op, *args, **kwargs):
    """Run a collective; a dead or unreachable peer becomes one clear error instead of a hang or a
    transport traceback (the process group's timeout bounds the wait)."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError and gloo/NCCL transport errors
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise PeerLost(f"another training process stopped or became unreachable ({reason}); "
                           "the last checkpoint is intact, rerun the command to resume") from None


def broadcast_(tree, src: int = 0):
    """Overwrite every leaf with rank src's value (identical parameters on every rank)."""
    for leaf in optree.tree_leaves(tree):
        _collective(dist.broadcast, leaf, src)
    return tree


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    t = torch.tensor([int(flag)], device=device)
    _collective(dist.all_reduce, t)
    return bool(t.item())


