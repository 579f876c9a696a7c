"""minifn.cpp_build: inductor's CPU kernels built a few to a library, and its one-time builds started early."""

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._inductor.async_compile import AsyncCompile, get_compile_threads
from torch._inductor.utils import fresh_cache

from minifn import cpp_build

pytestmark = pytest.mark.skipif(get_compile_threads() <= 1, reason="inductor builds in this process: nothing to batch")


def several_kernels(x, w):
    """Reductions and products between pointwise ops: inductor cannot fuse them into one kernel."""
    h = torch.tanh(x @ w).softmax(-1)
    h = (h - h.mean(0)) @ w.t()
    return torch.sigmoid(h).cumsum(0).norm(dim=-1) + x.exp().amax()


def compile_in_fresh_cache(batch: bool, x, w):
    """several_kernels compiled anew, and the kernel libraries inductor's cache then holds."""
    torch._dynamo.reset()
    with fresh_cache():
        with cpp_build.batched() if batch else contextlib.nullcontext():
            out = torch.compile(several_kernels, fullgraph=True)(x, w)
        libraries = list(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.main.so"))
    return out, libraries


def test_kernels_build_as_one_library_per_worker_and_compute_the_same():
    x, w = torch.randn(64, 32), torch.randn(32, 32)
    alone, one_each = compile_in_fresh_cache(False, x, w)
    together, batched = compile_in_fresh_cache(True, x, w)
    assert len(one_each) >= 3  # the function has kernels enough to batch
    assert len(batched) == min(get_compile_threads(), len(one_each)), (batched, one_each)
    torch.testing.assert_close(together, alone, rtol=0, atol=0)  # the same kernels, built with the same flags
    torch.testing.assert_close(together, several_kernels(x, w), rtol=1e-5, atol=1e-5)


def test_a_library_that_fails_to_build_falls_back_to_one_kernel_each(monkeypatch):
    x, w = torch.randn(16, 8), torch.randn(8, 8)
    monkeypatch.setattr(cpp_build, "library_source", lambda kernels: "this is not C++;\n")
    with pytest.warns(UserWarning, match="could not build inductor's kernels together"):
        out, _ = compile_in_fresh_cache(True, x, w)
    torch.testing.assert_close(out, several_kernels(x, w), rtol=1e-5, atol=1e-5)


KERNEL = cpp_build.PREFIX + textwrap.dedent("""
    {include}
    extern "C" void kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
    {{
        for (int64_t i = 0; i < ks0; i++) out_ptr0[i] = std::sqrt(in_ptr0[i]) + 1.0f;
    }}
    """)
ARGTYPES = ["const float*", "float*", "const int64_t"]


@pytest.mark.parametrize("include", ["", "#include <cmath>"])
def test_a_kernel_is_deferred_only_where_it_fits_in_a_namespace(include):
    """An include of its own (or a macro) cannot go inside a namespace: that kernel is built inductor's way."""
    x, out = torch.rand(5) * 9, torch.zeros(5)
    with fresh_cache(), cpp_build.batched():
        pending = len(cpp_build._pending)
        future = AsyncCompile().cpp_pybinding(ARGTYPES, KERNEL.format(include=include))
        deferred = len(cpp_build._pending) - pending
        future.result()(x, out, 5)
    assert deferred == (0 if include else 1)
    torch.testing.assert_close(out, x.sqrt() + 1)


def test_outside_the_context_kernels_are_built_inductors_way():
    with fresh_cache():
        AsyncCompile().cpp_pybinding(ARGTYPES, KERNEL.format(include="")).result()
    assert not cpp_build._pending


PREBUILD_THEN_COMPILE = """
import threading
from pathlib import Path
import torch
from minifn import cpp_build

cpp_build.prebuild()
for thread in threading.enumerate():
    if thread.name == "minifn-cpp-prebuild":
        thread.join()
headers = Path(__import__("tempfile").gettempdir()).glob("torchinductor_*/precompiled_headers/*.gch")
before = {p: p.stat().st_mtime_ns for p in headers}
with cpp_build.batched():
    torch.compile(lambda x: (x.exp() - x.mean()).sum(-1))(torch.randn(8, 8))
after = {p: p.stat().st_mtime_ns for p in before}
assert len(before) == 1 and after == before, (before, after)
print("ok")
"""


@pytest.mark.slow
def test_prebuild_builds_the_header_that_kernels_then_use(tmp_path):
    """A header built with other flags than the kernels' would be a second one, built again by the compile."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", PREBUILD_THEN_COMPILE], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
