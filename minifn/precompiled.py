"""Compiled steps kept on disk, so that a later run loads its step instead of tracing it again.

Inductor caches its kernels, but every new process still traces the step with dynamo: 3-5 s of each warm
start at the seed and bench shapes. torch's AOT precompile (`torch.compile(fn).aot_compile`, experimental in
torch 2.13) saves the traced, compiled function whole. A saved function is reused only when it would
compile the same thing, so its file is named by a hash of everything that decides what it computes:

  - the function: code, defaults and closure, recursively (configs, optimizer closures, partials);
  - minifn's source, torch's and Python's versions, dynamo's and inductor's settings;
  - the inputs: tree structure, shapes, strides, dtypes, devices.

Before a loaded function runs, every source file it traced must be unchanged and its guards (tensor
metadata, grad mode, autocast) must accept the inputs; otherwise it is compiled again and replaced. A
function holding something this module cannot name (an arbitrary object in a closure) is compiled the
ordinary way and never saved.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import os
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import optree
import torch

# What happened to each input signature this process met: 'compiled' and saved (or 'unsaved': the closure
# would not pickle), 'loaded' from an earlier run, or compiled the 'ordinary' way where AOT precompile failed.
stats: collections.Counter = collections.Counter()


class Unnameable(TypeError):
    """An object whose meaning fingerprint cannot pin down, so a function holding it is never saved."""


def _describe(obj, seen: set[int]):
    """A nested tuple of strings that equals another object's only if the two compute the same thing."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                       torch.memory_format, torch.layout, enum.Enum)):
        return (type(obj).__qualname__, repr(obj))
    if isinstance(obj, type):
        return ("type", obj.__module__, obj.__qualname__)
    if id(obj) in seen:  # a recursive closure (a function that calls itself by name)
        return ("seen",)
    seen = seen | {id(obj)}
    if isinstance(obj, functools.partial):
        return ("partial", _describe(obj.func, seen), _describe(obj.args, seen), _describe(obj.keywords, seen))
    if isinstance(obj, types.FunctionType):
        cells = tuple(c.cell_contents if c.cell_contents is not obj else None for c in obj.__closure__ or ())
        return ("function", obj.__module__, obj.__qualname__, _describe(obj.__code__, seen),
                _describe(obj.__defaults__, seen), _describe(obj.__kwdefaults__, seen), _describe(cells, seen))
    if isinstance(obj, types.CodeType):
        return ("code", obj.co_code.hex(), obj.co_names, _describe(obj.co_consts, seen))
    if isinstance(obj, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ("builtin", getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj)))
    if isinstance(obj, types.MethodType):
        return ("method", _describe(obj.__func__, seen), _describe(obj.__self__, seen))
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        return ("tensor", str(obj.dtype), tuple(obj.shape), str(obj.device), hashlib.sha256(data).hexdigest())
    if isinstance(obj, (tuple, list)):
        return (type(obj).__module__, type(obj).__qualname__, tuple(_describe(x, seen) for x in obj))
    if isinstance(obj, (set, frozenset)):
        return (type(obj).__qualname__, tuple(sorted(repr(_describe(x, seen)) for x in obj)))
    if isinstance(obj, dict):
        return ("dict", tuple(sorted((repr(k), _describe(v, seen)) for k, v in obj.items())))
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return ("dataclass", _describe(type(obj), seen), _describe(fields, seen))
    raise Unnameable(f"cannot fingerprint a {type(obj).__module__}.{type(obj).__qualname__}")


def fingerprint(obj) -> str:
    """sha256 of what obj computes (raises Unnameable for an object it cannot describe)."""
    return hashlib.sha256(repr(_describe(obj, set())).encode()).hexdigest()


@functools.cache
def _environment() -> str:
    """Everything outside the function and its inputs that changes what a compile produces."""
    root = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        sources.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    settings = (torch._dynamo.config.save_config_portable(), torch._inductor.config.save_config_portable(),
                torch._functorch.config.save_config_portable())
    return fingerprint((torch.__version__, sys.version, sources.hexdigest(), settings))


def _inputs(args: tuple) -> tuple:
    """The inputs' tree structure and, per leaf, tensor metadata or the value itself."""
    leaves, spec = optree.tree_flatten(args, none_is_leaf=True)
    described = tuple((tuple(x.shape), x.stride(), str(x.dtype), str(x.device), x.requires_grad)
                      if isinstance(x, torch.Tensor) else _describe(x, set()) for x in leaves)
    return (str(spec), described, torch.is_grad_enabled(), torch.is_autocast_enabled())


def _sources_unchanged(compiled) -> bool:
    """Every function the saved compile traced still has the same source lines."""
    for source in compiled.source_info().inlined_sources:
        try:
            lines = inspect.getsourcelines(importlib.import_module(source.module))[0]
        except (ImportError, OSError, TypeError):
            return False
        text = "".join(lines[source.firstlineno - 1:source.lastlineno - 1])
        if hashlib.sha256(text.encode()).hexdigest() != source.checksum:
            return False
    return True


def _load(path: Path):
    """The compiled function saved at path, or None if there is none or it is stale or unreadable."""
    try:
        with open(path, "rb") as f:
            compiled = torch.compiler.load_compiled_function(f)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged or incompatible file is a cache miss: compile and replace it
        return None
    return compiled if _sources_unchanged(compiled) else None


def _save(compiled, path: Path) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
    try:
        compiled.save_compiled_function(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def saved_compile(fn: Callable, directory: Path) -> Callable | None:
    """fn compiled (fullgraph, static shapes) and saved under directory, one file per input signature;
    None where fn cannot be named (compile it the ordinary way), this torch has no AOT precompile, or
    inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)."""
    if torch._inductor.config.force_disable_caches:
        return None
    try:
        name = fingerprint((fn, _environment()))
    except Unnameable:
        return None
    compiler = torch.compile(fn, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
    if not hasattr(compiler, "aot_compile"):
        return None
    entries, ordinary = [], []

    def entry_for(args):
        path = directory / f"{fingerprint((name, _inputs(args)))}.bin"
        compiled = _load(path)
        if compiled is not None and compiled.guard_check(*args):
            stats["loaded"] += 1
        else:
            compiled = compiler.aot_compile((args, {}))
            stats["compiled"] += 1
            try:
                _save(compiled, path)
            except Exception:  # noqa: BLE001 - an unpicklable closure: this run still uses the compiled step
                stats["unsaved"] += 1
        compiled.disable_guard_check()  # call() checks the guards once per call
        return compiled

    def call(*args):
        for compiled in entries:
            if compiled.guard_check(*args):
                return compiled(*args)
        if not ordinary:
            try:
                entries.append(entry_for(args))
                return entries[-1](*args)
            except Exception:  # noqa: BLE001 - AOT precompile is experimental: where it fails, compile as usual
                stats["ordinary"] += 1
                ordinary.append(torch.compile(fn, fullgraph=True, dynamic=False))
        return ordinary[0](*args)

    return call
