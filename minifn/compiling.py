"""`torch.compile` for the train, eval and decode steps, with one policy for every caller.

'on' compiles (fullgraph, static shapes), 'off' runs eagerly, 'auto' compiles where the platform can
and falls back to eager, with one warning, when the platform cannot or the *first* call fails (except
for running out of memory, which eager would too). After a first call succeeds, errors surface: an
out-of-memory error or a bug at step 5000 must not silently switch a run to eager with other numerics.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from minifn import trees
from minifn.precompiled import saved_compile

MODES = ("auto", "on", "off")

# Inductor settings for a step with dropout. Its masks hash keys folded in per step, micro-batch, layer and
# site, and each fold reads its key 8 times. Inductor inlines a reused result of up to 50 ops (30 on GPUs)
# into every reader, so the inlined code grew as 8**depth: 85x the loop-body nodes of the step without
# dropout and 5-6x its compile time. Realizing anything over 10 ops computes each key and mask once
# (benchmarks/dropout_compile.py).
DROPOUT_OPTIONS = {"realize_opcount_threshold": 10}


class CompileError(RuntimeError):
    """torch.compile cannot work here: no compiler, or a damaged artifact in inductor's cache."""


def cannot_compile(device: torch.device) -> str | None:
    """Why torch.compile cannot work on this device, or None if it should."""
    if device.type == "mps":
        return "inductor does not support MPS"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++")):
        return "inductor on CPU needs a C++ compiler (install gcc or clang)"
    return None


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()


def _damaged_cache(error: BaseException) -> bool:
    """A compiled library that fails to load ('file too short', 'invalid ELF header'): a truncated artifact."""
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, (ImportError, OSError)) or "file too short" in text or "invalid ELF header" in text


def _explain(error: BaseException) -> BaseException:
    if _damaged_cache(error):
        return CompileError(f"torch.compile could not load a compiled kernel ({str(error).splitlines()[0][:100]});"
                                 f" inductor's cache is probably damaged by an interrupted build: remove "
                                 f"{inductor_cache_dir()} and run again (or use --compile off)")
    return error


def _is_float64_cpu_scalar(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64 and x.device.type == "cpu"


def _lift_scalars(tree):
    """tree with each 0-D float64 CPU tensor viewed as shape [1], and the indices of those leaves.

    Dynamo gives every 0-D float64 CPU input (our hyperparameters) a float symbol that its tensorify pass
    cannot use and then specializes by restarting the whole trace (pytorch#140346): 3 s of a 31 s cold compile.
    A [1]-shaped view of the same memory is an ordinary input; the compiled function views it back."""
    leaves = trees.leaves(tree)
    lifted = tuple(i for i, x in enumerate(leaves) if _is_float64_cpu_scalar(x))
    return trees.rebuild(tree, [x.view(1) if i in lifted else x for i, x in enumerate(leaves)]), lifted


def _lowering_scalars(fn: Callable) -> Callable:
    """fn over a tree lifted by _lift_scalars: the lifted leaves are 0-D again before fn sees them."""

    def lowered(tree, lifted: tuple[int, ...]):
        leaves = trees.leaves(tree)
        for i in lifted:  # a loop over the few lifted leaves, not a test per leaf (dynamo interprets each)
            leaves[i] = leaves[i].view(())
        args, kwargs = trees.rebuild(tree, leaves)
        return fn(*args, **kwargs)

    return lowered


def maybe_compile(fn: Callable, mode: str, device: torch.device | str, options: dict | None = None) -> Callable:
    """fn compiled per mode ('auto', 'on', 'off'), with inductor options (as torch.compile's); see the module
    docstring for the fallback rule."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of: {', '.join(MODES)}")
    reason = cannot_compile(torch.device(device))
    if mode == "off" or (mode == "auto" and reason):
        if reason and mode == "auto":
            warnings.warn(f"torch.compile unavailable ({reason}); running eagerly", stacklevel=2)
        return fn
    if reason:
        raise CompileError(f"--compile on is impossible here: {reason}")
    from minifn import cpp_build  # imports inductor, which only a compiled step needs

    lowered = _lowering_scalars(fn)
    prebuild = cpp_build.prebuild if torch.device(device).type == "cpu" else None
    inner = saved_compile(lowered, Path(inductor_cache_dir()) / "minifn-steps", options, before_compile=prebuild)
    if inner is None:
        inner = torch.compile(lowered, fullgraph=True, dynamic=False, options=options)
        if prebuild:  # whether inductor's cache has this step is known only inside the call: start it anyway
            prebuild()

    def compiled(*args, **kwargs):
        with cpp_build.batched():
            return inner(*_lift_scalars((args, kwargs)))

    active, first = [compiled], [True]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not first[0]:
            return active[0](*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the first call decides between compiled and eager
            if mode == "on" or _damaged_cache(e) or isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                raise _explain(e) from e  # out of memory: a smaller batch helps; eager would need more
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "running eagerly", stacklevel=2)
            active[0] = fn
            out = fn(*args, **kwargs)
        first[0] = False
        return out

    return call
