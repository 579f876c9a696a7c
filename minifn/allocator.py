"""Keep freed memory in the process, so that an eager CPU step does not page-fault its tensors back in.

An eager step allocates and frees the same large tensors every step (logits, activations, gradients).
glibc's malloc hands blocks above its mmap threshold (adaptive, at most 32 MB) straight back to the
kernel on free and trims the top of its heap, so the next step touches fresh pages and takes a page
fault per 4 KB. Raising both thresholds keeps the memory mapped for reuse, as a caching allocator
(or jemalloc, which PyTorch's CPU tuning guide suggests) would: the peak memory is the same, the
faults are gone. Measured in benchmarks/allocator.py. Process-wide, so the command line calls it at
start; a script can too. A no-op off glibc, or when the user set glibc's malloc variables themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # only blocks of 1 GiB and more are mapped on their own
TRIM_THRESHOLD = (1 << 31) - 1  # the heap top is returned only when 2 GiB of it are free


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True if they were set."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False  # MALLOC_MMAP_THRESHOLD_ and friends: the user's choice stands
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
