"""Inductor's C++ build for minifn's compiled steps on the CPU: kernels built a few to a library, and the
one-time builds started before tracing.

Inductor builds each CPU kernel as a library of its own, one g++ call each, and every call first loads the
150 MB precompiled header of ATen's vector types: 0.6 s, against about 0.15 s for the kernel itself. The
seed step's 35 kernels took 19 s on two cores that way, and 3.6 s as two libraries of 17 and 18 (one g++
call per compile worker). Inside `batched()`, inductor's `cpp_pybinding` defers each kernel, and the first
kernel asked for builds every deferred one: a library per compile worker, built in parallel, each kernel in
a namespace of its own with the Python binding inductor gives it. The source is inductor's, compiled with
its flags; a kernel that cannot sit in a namespace (an include or a macro of its own) is built inductor's
way, and so is a library whose build fails, with a warning.

`prebuild()` runs inductor's one-time builds (its probe of the CPU's vector instructions, and the
precompiled header where this machine has none yet: 5 s and 10 s here) in a background thread, so that
they use the second core while dynamo traces the step, instead of waiting until the first kernel needs them.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import types
import warnings

from torch._inductor.async_compile import AsyncCompile, get_compile_threads
from torch._inductor.codecache import CppPythonBindingsCodeCache, LambdaFuture
from torch._inductor.utils import clear_on_fresh_cache

PREFIX = "#include <torch/csrc/inductor/cpp_prefix.h>"
ENTRY = 'extern "C"'

# A kernel whose whole build exercises the same flags, vector ISA and precompiled header as inductor's own.
_PROBE = PREFIX + '\nextern "C" void kernel(float* out_ptr0) { out_ptr0[0] = 0.0f; }\n'

_batching = contextvars.ContextVar("minifn_batching_cpp_kernels", default=False)
_lock = threading.Lock()
_pending: list[_Kernel] = []
_original_cpp_pybinding = AsyncCompile.cpp_pybinding


@clear_on_fresh_cache
class _Library(CppPythonBindingsCodeCache):
    """A library of several kernels, each with a Python module of its own (PyInit_kernel_<i>)."""

    cache: dict = {}
    cache_clear = staticmethod(cache.clear)

    @classmethod
    def _load_library_inner(cls, path: str, key: str):
        return types.SimpleNamespace(path=path)  # its kernels' modules are imported one by one


class _Kernel:
    """One deferred kernel: its source, then the library it went into and its index there."""

    def __init__(self, argtypes: list[str], source: str):
        self.argtypes, self.source = argtypes, source
        self.library, self.index, self.function = None, 0, None

    def result(self):
        if self.function is None:
            with _lock:
                if self.library is None:
                    _build_pending()
            self.function = self._load()
        return self.function

    def _load(self):
        try:
            library = self.library()
        except Exception as e:  # noqa: BLE001 - g++ refused the combined source: build this kernel alone
            warnings.warn(f"minifn could not build inductor's kernels together ({type(e).__name__}); building them"
                          " one at a time (a bug in minifn.cpp_build: please report it)", stacklevel=2)
            return CppPythonBindingsCodeCache.load_pybinding(self.argtypes, self.source)
        entry = f"kernel_{self.index}"
        loader = type("_KernelModule", (CppPythonBindingsCodeCache,), {"entry_function": entry})
        return getattr(loader._load_library_inner(library.path, library.key), entry)


def _placeable(source: str) -> bool:
    """Whether a kernel's source can go into a namespace: inductor's prefix include, one C entry point, and no
    include or macro of its own."""
    if not source.lstrip().startswith(PREFIX):
        return False
    body = source.replace(PREFIX, "", 1)
    return body.count(ENTRY) == 1 and not any(line.lstrip().startswith(("#include", "#define"))
                                              for line in body.splitlines())


def _binding(index: int, argtypes: list[str]) -> str:
    """Inductor's Python binding of a kernel, as a module named kernel_<index>."""
    parse = ", ".join(f"parse_arg<{t.replace('const ', '')}>(args, {n})" for n, t in enumerate(argtypes))
    cls = CppPythonBindingsCodeCache
    return cls.suffix_template.format(arg_len=len(argtypes), call_entry_func=cls.call_entry_function.format(parse),
                                      entry_func=f"kernel_{index}", extra_parse_arg="")


def library_source(kernels: list[_Kernel]) -> str:
    """One translation unit of kernels: the includes once, then each kernel and its binding in a namespace."""
    head, parts = [PREFIX], []
    for i, kernel in enumerate(kernels):
        body = kernel.source.replace(PREFIX, "", 1).replace(ENTRY, "", 1)
        lines = []
        for line in _binding(i, kernel.argtypes).splitlines():
            if line.lstrip().startswith(("#include", "#define")):
                if line.strip() not in head:
                    head.append(line.strip())
            else:
                lines.append(line)
        parts.append(f"namespace minifn_kernel_{i} {{\n{body}\n" + "\n".join(lines) + f"\n}}  // kernel {i}\n")
    return "\n".join(head) + "\n\n" + "\n".join(parts)


def _build_pending() -> None:
    """Start building every deferred kernel: one library per compile worker (called holding _lock)."""
    kernels = list(_pending)
    _pending.clear()
    groups = min(get_compile_threads(), len(kernels))
    for g in range(groups):
        group = kernels[g::groups]
        library = _Library.load_async(library_source(group), "cpu", submit_fn=AsyncCompile.submit)
        for i, kernel in enumerate(group):
            kernel.library, kernel.index = library, i


def _cpp_pybinding(self, argtypes: list[str], source_code: str):
    """AsyncCompile.cpp_pybinding, deferred into a library of several kernels inside batched()."""
    if not _batching.get() or get_compile_threads() <= 1 or not _placeable(source_code):
        return _original_cpp_pybinding(self, argtypes, source_code)
    kernel = _Kernel(list(argtypes), source_code)
    with _lock:
        _pending.append(kernel)
    return LambdaFuture(kernel.result)


@contextlib.contextmanager
def batched():
    """Within this context (in this thread), inductor's CPU kernels are built a few to a library."""
    if AsyncCompile.cpp_pybinding is not _cpp_pybinding:
        AsyncCompile.cpp_pybinding = _cpp_pybinding  # defers only where _batching is set
    token = _batching.set(True)
    try:
        yield
    finally:
        _batching.reset(token)


def _prebuild() -> None:
    try:
        CppPythonBindingsCodeCache.load_pybinding(["float*"], _PROBE)
    except Exception:  # noqa: BLE001 - only a head start: the compile itself reports what fails
        pass


_started: set[str] = set()


def prebuild() -> None:
    """Start inductor's one-time C++ builds in a background thread (once per process and inductor cache)."""
    from minifn.compiling import inductor_cache_dir

    with _lock:
        if inductor_cache_dir() in _started:
            return
        _started.add(inductor_cache_dir())
    threading.Thread(target=_prebuild, name="minifn-cpp-prebuild", daemon=True).start()
