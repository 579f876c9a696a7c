"""Compiled steps kept on disk, so that a later run loads its step instead of tracing it again.

Inductor caches its kernels, but every new process still traces the step with dynamo: 3-5 s of each warm
start at the seed and bench shapes. torch's AOT precompile (`torch.compile(fn).aot_compile`, experimental in
torch 2.13) saves the traced, compiled function whole. A saved function is reused only when it would
compile the same thing, so its file is named by a hash of everything that decides what it computes:

  - the function: code, defaults, closure and the globals it uses, recursively (configs, optimizer
    closures, partials, helpers); functions of Python and installed packages by name, since their
    versions and traced lines are checked anyway;
  - the inductor options it is compiled with, minifn's source, torch's and Python's versions, and
    dynamo's, inductor's and functorch's settings;
  - the inputs: tree structure, shapes, strides, dtypes, devices.

A directory keeps at most MAX_SAVED_BYTES of them, the least recently used deleted first.

Before a loaded function runs, every source file it traced must be unchanged and its guards (tensor
metadata, grad mode, autocast) must accept the inputs; otherwise it is compiled again and replaced. A
function holding something this module cannot describe (an arbitrary object in a closure) is compiled the
ordinary way and never saved; a global of such a type (a logger) is described by its type alone.
An object the saved code reaches through a global dict must sit under a string or number key: dynamo
saves an entry under an object key as its position in the dict, which another process may not share
(model._SKELETONS is keyed by config.key for that reason). And the globals a step reads are part of its
name, so they must not depend on what else the process built: a dict of every model's parameter names
would name the same step differently in two processes (the names live on each skeleton instead).
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
import sysconfig
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import optree
import torch

# The saved steps a cache directory keeps, newest use first (each 1-3 MB); past this, the least recently used
# are deleted as a new one is saved. Inductor's own cache is never pruned; minifn's part of it is.
MAX_SAVED_BYTES = 512 * 2**20

# What happened to each input signature this process met: 'compiled' and saved (or 'unsaved': the closure
# would not pickle), 'loaded' from an earlier run, or compiled the 'ordinary' way where AOT precompile failed.
stats: collections.Counter = collections.Counter()


class Unnameable(TypeError):
    """An object whose meaning fingerprint cannot pin down, so a function holding it is never saved."""


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib"))


@functools.cache
def _is_library(module_name: str) -> bool:
    """Python's own modules and installed packages: pinned by their versions in the environment key, and
    their traced lines by the source check on load, so their functions are named, not described."""
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if file is None:  # builtins; but also `python -c`, exec'd code and notebooks, which must be described
        return module_name in sys.builtin_module_names
    return os.path.realpath(file).startswith(_library_dirs())


def _names(code: types.CodeType) -> set[str]:
    """Global (and attribute) names a function's code, and the code nested in it, refers to."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def _describer() -> Callable:
    """describe(obj): a nested tuple of strings, equal for two objects only if they compute the same thing.
    Functions are described by code, defaults, closure and the globals they use, recursively (memoized)."""
    memo: dict[int, tuple] = {}  # id -> (obj, description): holding obj keeps its id from being reused

    def function(fn: types.FunctionType) -> tuple:
        if _is_library(fn.__module__):
            return ("library function", fn.__module__, fn.__qualname__)
        cells = tuple(_cell_contents(c) for c in fn.__closure__ or ())
        used = {name: fn.__globals__[name] for name in sorted(_names(fn.__code__)) if name in fn.__globals__}
        return ("function", fn.__module__, fn.__qualname__, describe(fn.__code__), describe(fn.__defaults__),
                describe(fn.__kwdefaults__), describe(cells), tuple((k, global_value(v)) for k, v in used.items()))

    def global_value(value) -> tuple:
        if isinstance(value, types.ModuleType):
            return ("module", value.__name__)
        try:
            return describe(value)
        except Unnameable:  # a logger, a registry: named by type (see the module docstring)
            return ("object", type(value).__module__, type(value).__qualname__)

    def describe(obj) -> tuple:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                           torch.memory_format, torch.layout, enum.Enum)):
            return (type(obj).__qualname__, repr(obj))
        if isinstance(obj, type):
            return ("type", obj.__module__, obj.__qualname__)
        if id(obj) in memo:
            return memo[id(obj)][1]
        memo[id(obj)] = obj, ("cycle",)  # what a reference back to obj from inside it describes as
        described = describe_new(obj)
        memo[id(obj)] = obj, described
        return described

    def describe_new(obj) -> tuple:
        if isinstance(obj, functools.partial):
            return ("partial", describe(obj.func), describe(obj.args), describe(obj.keywords))
        if isinstance(obj, types.FunctionType):
            return function(obj)
        if isinstance(obj, types.CodeType):
            return ("code", obj.co_code.hex(), obj.co_names, describe(obj.co_consts))
        if isinstance(obj, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ("builtin", getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj)))
        if isinstance(obj, types.MethodType):
            return ("method", describe(obj.__func__), describe(obj.__self__))
        if isinstance(obj, torch.Tensor):
            data = obj.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            return ("tensor", str(obj.dtype), tuple(obj.shape), str(obj.device), hashlib.sha256(data).hexdigest())
        if isinstance(obj, (tuple, list)):
            return (type(obj).__module__, type(obj).__qualname__, tuple(describe(x) for x in obj))
        if isinstance(obj, (set, frozenset)):
            return (type(obj).__qualname__, tuple(sorted(repr(describe(x)) for x in obj)))
        if isinstance(obj, dict):
            return ("dict", tuple(sorted((repr(k), describe(v)) for k, v in obj.items())))
        if dataclasses.is_dataclass(obj):
            return ("dataclass", describe(type(obj)), describe({f.name: getattr(obj, f.name)
                                                               for f in dataclasses.fields(obj)}))
        raise Unnameable(f"cannot fingerprint a {type(obj).__module__}.{type(obj).__qualname__}")

    return describe


def fingerprint(obj) -> str:
    """sha256 of what obj computes (raises Unnameable for an object it cannot describe)."""
    return hashlib.sha256(repr(_describer()(obj)).encode()).hexdigest()


@functools.cache
def _minifn_source() -> str:
    root = Path(__file__).resolve().parent
    sources = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        sources.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return sources.hexdigest()


def _environment() -> str:
    """Everything outside the function and its inputs that changes what a compile produces (the settings
    are read at each compile: a script may change them between two)."""
    settings = (torch._dynamo.config.save_config_portable(), torch._inductor.config.save_config_portable(),
                torch._functorch.config.save_config_portable(),
                torch.backends.mkldnn.enabled)  # minifn.onednn's switch
    return fingerprint((torch.__version__, sys.version, _minifn_source(), settings))


def _inputs(args: tuple) -> tuple:
    """The inputs' tree structure and, per leaf, tensor metadata or the value itself."""
    leaves, spec = optree.tree_flatten(args, none_is_leaf=True)
    describe = _describer()
    described = tuple((tuple(x.shape), x.stride(), str(x.dtype), str(x.device), x.requires_grad)
                      if isinstance(x, torch.Tensor) else describe(x) for x in leaves)
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
    except Exception:  # noqa: BLE001 - missing, damaged or from another torch: a miss; compile and replace it
        return None
    if not _sources_unchanged(compiled):
        return None
    try:
        os.utime(path)  # a use, for pruning: least recently used goes first
    except OSError:  # a read-only shared cache: still usable
        pass
    return compiled


def _save(compiled, path: Path) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        compiled.save_compiled_function(tmp)
        os.chmod(tmp, 0o644)  # torch writes it 0600, which would keep a shared cache from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prune(directory: Path, max_bytes: int) -> None:
    """Delete the least recently used saved steps in directory until the rest fit in max_bytes."""
    files = []
    for path in directory.glob("*.bin"):
        try:
            stat = path.stat()
        except OSError:  # deleted meanwhile by another process pruning the same cache
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size


def _record_each_source_once() -> None:
    """AOT precompile records the source of every function dynamo inlined, once per inlining: at the seed shape
    5,400 `inspect.getsourcelines` calls, each re-tokenizing its file, for about 300 functions. Memoize the
    record per code object (a code object's source is that of its import); the saved records are the same."""
    try:
        from torch._dynamo.package import SourceInfo as source_info
    except ImportError:  # another torch: nothing to speed up, or nothing to do it to
        return
    add_code = getattr(source_info, "add_code", None)
    if add_code is None or getattr(add_code, "memoized", False):
        return
    records: dict[int, tuple[types.CodeType, set]] = {}  # id -> (code, what add_code added): code kept alive

    def memoized(self, code: types.CodeType) -> None:
        if id(code) not in records:
            alone = source_info(inlined_sources=set())
            add_code(alone, code)
            records[id(code)] = code, alone.inlined_sources
        self.inlined_sources.update(records[id(code)][1])

    memoized.memoized, memoized.original = True, add_code
    source_info.add_code = memoized


def available() -> bool:
    """Whether torch.compile offers AOT precompile (torch 2.13 does; 2.11 has neither it nor portable guards).
    Asked anew each time: a test may replace torch.compile."""
    return (hasattr(torch.compiler, "keep_portable_guards_unsafe")
            and hasattr(torch.compile(lambda: None), "aot_compile"))


def saved_compile(fn: Callable, directory: Path, options: dict | None = None,
                  before_compile: Callable[[], None] | None = None) -> Callable | None:
    """fn compiled (fullgraph, static shapes, with inductor options as torch.compile's) and saved under
    directory, one file per input signature; None where fn cannot be named (compile it the ordinary way),
    this torch has no AOT precompile, or inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1).
    before_compile is called before each trace (not when a saved function is loaded)."""
    before_compile = before_compile or (lambda: None)
    if torch._inductor.config.force_disable_caches or not available():
        return None
    try:
        name = fingerprint((fn, options))
    except Unnameable:
        return None
    compiler = torch.compile(fn, fullgraph=True, dynamic=False,
                             options={**(options or {}), "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
    _record_each_source_once()
    entries, ordinary = [], []

    def entry_for(args):
        path = directory / f"{fingerprint((name, _environment(), _inputs(args)))}.bin"  # settings as of this call
        compiled = _load(path)
        if compiled is not None and compiled.guard_check(*args):
            stats["loaded"] += 1
        else:
            before_compile()
            compiled = compiler.aot_compile((args, {}))
            stats["compiled"] += 1
            try:
                _save(compiled, path)
            except Exception:  # noqa: BLE001 - an unpicklable closure: this run still uses the compiled step
                stats["unsaved"] += 1
            else:
                prune(directory, MAX_SAVED_BYTES)
        compiled.disable_guard_check()  # call() checks the guards once per call
        return compiled

    def call(*args):
        for compiled in entries:
            if compiled.guard_check(*args):
                return compiled(*args)
        if not ordinary:
            try:
                entries.append(entry_for(args))
            except Exception:  # noqa: BLE001 - AOT precompile is experimental: where it fails, compile as usual
                stats["ordinary"] += 1
                before_compile()
                ordinary.append(torch.compile(fn, fullgraph=True, dynamic=False, options=options))
            else:  # outside the try: an error in the step itself must not run it a second time
                return entries[-1](*args)
        return ordinary[0](*args)

    return call
