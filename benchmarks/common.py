"""Shared pieces of the benchmarks: configs, the variants under test, timing, FLOPs and the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from minifn import ModelConfig, init_params, optim
from minifn.reference import ReferenceTransformer
from minifn.step import init_state, make_train_step

# The tutorial's command as `minifn train` runs it (tied head, biases), the tutorial's shape with the untied head
# the original "Mini" had, a wider one, and a GPU-sized one.
CONFIGS = {
    "tutorial": (ModelConfig(vocab_size=32000, embed_dim=256, num_layers=4, num_heads=8, head_dim=16, ff_dim=768,
                             max_seq_len=128, bias=True, tie_embeddings=True), 2),
    "seed": (ModelConfig(vocab_size=32000, embed_dim=256, num_layers=4, num_heads=8, head_dim=32, ff_dim=1024,
                         max_seq_len=128, tie_embeddings=False), 2),
    "bench": (ModelConfig(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, head_dim=64, ff_dim=2048,
                          max_seq_len=256, tie_embeddings=False), 8),
    "tiny": (ModelConfig(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, head_dim=16, ff_dim=128,
                         max_seq_len=32, tie_embeddings=False), 2),
    "large": (ModelConfig(vocab_size=32000, embed_dim=1024, num_layers=12, num_heads=16, head_dim=64, ff_dim=2816,
                          max_seq_len=1024, tie_embeddings=False), 8),
}
LR, WEIGHT_DECAY = 1e-3, 0.01
VARIANTS = {
    "a": "eager nn.Module + torch.optim.AdamW",
    "a_fused": "eager nn.Module + AdamW(fused=True)",
    "b": "torch.compile(module) + AdamW",
    "c_pure": "minifn train_step, eager, pure (a new state each step)",
    "c": "minifn train_step, eager, state donated (inplace=True, as minifn train runs)",
    "d": "minifn train_step, compiled, state donated",
    # d as it was before minifn.onednn: every product in aten's MKL (oneDNN switched off while it traces and runs)
    "d_mkl": "minifn train_step, compiled, state donated, oneDNN off",
    # d with every forward product and input gradient in oneDNN, as before the route was timed per shape
    "d_onednn": "minifn train_step, compiled, state donated, MINIFN_LINEAR=onednn",
    # The same under bfloat16 autocast (minifn train's --dtype auto where the hardware has bfloat16):
    # float32 parameters and optimizer, bfloat16 matmuls.
    "a_bf16": "eager nn.Module + AdamW(fused=True), bfloat16 autocast",
    "b_bf16": "torch.compile(module) + AdamW, bfloat16 autocast",
    "c_bf16": "minifn train_step, eager, state donated, bfloat16 autocast",
    "d_bf16": "minifn train_step, compiled, state donated, bfloat16 autocast",
}
COMPILED = ("b", "d", "d_mkl", "d_onednn", "b_bf16", "d_bf16")


def bench_device() -> torch.device:
    """MINIFN_BENCH_DEVICE (set by --device, inherited by the worker processes), else CUDA when present."""
    name = os.environ.get("MINIFN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync() -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if bench_device().type == "cuda":
        torch.cuda.synchronize()


def batch_for(config: ModelConfig, batch_size: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.max_seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous().to(bench_device()), tokens[:, 1:].contiguous().to(bench_device())


@contextlib.contextmanager
def linear_route(route: str | None):
    """MINIFN_LINEAR set to route (None: as it was) while a step runs: minifn.onednn reads it per product."""
    before = os.environ.get("MINIFN_LINEAR")
    if route is not None:
        os.environ["MINIFN_LINEAR"] = route
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINIFN_LINEAR", None)
        else:
            os.environ["MINIFN_LINEAR"] = before


def build(variant: str, config: ModelConfig, batch_size: int):
    """A no-argument function that runs one training step of the variant (same params, same batch)."""
    device = bench_device()
    params = init_params(config, seed=0, device=device)
    x, y = batch_for(config, batch_size)
    kind, bf16, _ = variant.partition("_bf16")
    autocast_dtype = torch.bfloat16 if bf16 else None
    if kind in ("a", "a_fused", "b"):
        module = ReferenceTransformer(config).to(device)
        module.load_state_dict(params)
        fused = kind == "a_fused" or (kind == "a" and autocast_dtype is not None)
        opt = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
        forward = torch.compile(module) if kind == "b" else module

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = forward(x)
            F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
            opt.step()

        return step
    tx = optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    train_step = make_train_step(config, tx, compile="on" if kind in ("d", "d_mkl", "d_onednn") else "off",
                                 inplace=kind != "c_pure", autocast_dtype=autocast_dtype, device=device)
    holder = [init_state(params, tx)]

    def step():
        with torch.backends.mkldnn.flags(enabled=False) if kind == "d_mkl" else contextlib.nullcontext(), \
                linear_route("onednn" if kind == "d_onednn" else None):
            holder[0], _ = train_step(holder[0], (x, y))

    return step


def round_robin(config_name: str, variants: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Step every variant in turn for `rounds` rounds in this process (after a compile and a warm step each), so
    machine noise hits them alike; per variant, each round's step seconds and minor page faults."""
    config, batch_size = CONFIGS[config_name]
    steps = {v: build(v, config, batch_size) for v in variants}
    for step in steps.values():
        step()
        step()
    sync()
    out = {v: {"seconds": [], "faults": []} for v in variants}
    for _ in range(rounds):
        for v, step in steps.items():
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step()
            sync()
            out[v]["seconds"].append(time.perf_counter() - start)
            out[v]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return out


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(n: int = 1024, repeats: int = 20) -> float:
    """Float32 matrix-multiply FLOP/s of this machine, measured now (the MFU denominator)."""
    if bench_device().type == "cuda":
        n = max(n, 8192)  # a GPU needs a large product to reach its peak
    a, b = torch.randn(n, n, device=bench_device()), torch.randn(n, n, device=bench_device())
    for _ in range(3):
        a @ b
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def step_flops(config: ModelConfig, batch_size: int) -> float:
    """Model FLOPs per step: 6 x (matmul parameters) per token, plus causal attention
    6 x layers x T x heads x head_dim per token (half of PaLM's 12 L T d, for the causal mask)."""
    from minifn.model import num_params

    matmul_params = num_params(config) - config.vocab_size * config.embed_dim * (not config.tie_embeddings)
    tokens = batch_size * config.max_seq_len
    attention = 6 * config.num_layers * config.max_seq_len * config.num_heads * config.head_dim
    return (6 * matmul_params + attention) * tokens


def peak_memory_mb() -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the resident set size."""
    if bench_device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vector_level() -> str:
    """The widest vector kernels torch's CPU ops use here (AVX2, AVX512, ...): it decides how the BLAS
    libraries and the variants rank, so sections that compare them are kept per level."""
    return torch.backends.cpu.get_cpu_capability()


def machine() -> str:
    cpu, flags = "unknown CPU", set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = vector_level() + (", native bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "")
    gpu = f", GPU {torch.cuda.get_device_name()}" if bench_device().type == "cuda" else ""
    return (f"{cpu} ({isa}), {os.cpu_count()} cores{gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def cache_env(folder: str) -> dict[str, str]:
    """The environment a child process compiles in: inductor's cache and its temporary folder in folder (empty
    for a cold compile, as on a new machine: inductor keeps the precompiled header of its kernels in the
    temporary folder, outside its cache, and builds it once per machine), or, in a smoke run
    (MINIFN_BENCH_SMOKE=1, the test suite's tiny runs, whose numbers nobody reads), the cache this process
    inherited, so that the suite compiles each graph once however many scripts build it."""
    if os.environ.get("MINIFN_BENCH_SMOKE"):
        return {}
    os.makedirs(os.path.join(folder, "tmp"), exist_ok=True)
    return {"TORCHINDUCTOR_CACHE_DIR": folder, "TMPDIR": os.path.join(folder, "tmp")}


def run_script(script, args: list[str], cache: str | None = None, cwd=None, env: dict | None = None) -> dict:
    """Run a benchmark script in a new Python process and return its last line of output, read as JSON (how
    every script's parent reads its workers).

    Args:
      script: the script's path (a parent passes its own __file__).
      args: its command-line arguments.
      cache: the inductor cache folder it compiles in, per cache_env (None: this process's cache).
      cwd: its working folder (None: this one's).
      env: more environment variables for it."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(cache_env(cache) if cache else {}), **(env or {})}
    out = subprocess.run([sys.executable, str(script), *args], env=full_env, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_caches(folders, into) -> None:
    """Copy inductor cache folders into one, so a later process loads every graph the earlier cold runs
    compiled instead of compiling each again (its entries are named by content hashes: merging is safe)."""
    for folder in folders:
        if os.path.isdir(folder):  # a variant that compiled nothing, or a smoke run, leaves none
            shutil.copytree(folder, into, dirs_exist_ok=True)


def write_section(path, name: str, text: str) -> None:
    """Replace (or append) the section between <!-- name --> markers, so each script owns its part."""
    from pathlib import Path

    path = Path(path)
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    old = path.read_text() if path.exists() else "# minifn benchmarks\n\nEach section is written by its script.\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new if new.endswith("\n") else new + "\n")
