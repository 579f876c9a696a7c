"""`torch.compile` for the train, eval and decode steps, with one policy for every caller.

'on' compiles (fullgraph, static shapes), 'off' runs eagerly, 'auto' compiles where the platform can
and falls back to eager, with one warning, when the platform cannot or the *first* call fails to
compile. After a first call succeeds, errors surface: an out-of-memory error or a bug at step 5000
must not silently switch a run to eager with other numerics.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable

import torch

MODES = ("auto", "on", "off")


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


def maybe_compile(fn: Callable, mode: str, device: torch.device | str) -> Callable:
    """fn compiled per mode ('auto', 'on', 'off'); see the module docstring for the fallback rule."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of: {', '.join(MODES)}")
    reason = cannot_compile(torch.device(device))
    if mode == "off" or (mode == "auto" and reason):
        if reason and mode == "auto":
            warnings.warn(f"torch.compile unavailable ({reason}); running eagerly", stacklevel=2)
        return fn
    if reason:
        raise CompileError(f"--compile on is impossible here: {reason}")
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    active, first = [compiled], [True]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not first[0]:
            return active[0](*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the first call decides between compiled and eager
            if mode == "on" or _damaged_cache(e):
                raise _explain(e) from e
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "running eagerly", stacklevel=2)
            active[0] = fn
            out = fn(*args, **kwargs)
        first[0] = False
        return out

    return call
