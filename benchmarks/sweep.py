"""Sweep benchmark: K learning rates trained in one compiled, vmapped step against K compiled runs in turn.

    python benchmarks/sweep.py                 # K = 8, tiny config, writes its section of RESULTS.md
    python benchmarks/sweep.py --quick         # fewer rounds, no flash-attention row
    python benchmarks/sweep.py --config seed --k 4 --device cuda

Speed: one process builds both (the sweep: minifn.sweep.make_sweep_step over K stacked AdamW states whose
learning rates differ; the sequential runs: one compiled train_step called on each of K states) and steps
them round-robin, so machine noise hits both alike; the ratio is of medians. Memory: each variant in its
own process (peak RSS on a CPU, the allocator's peak on a GPU), the sweep against one run, which K
separate runs would need K times over. Every process keeps freed memory (minifn.allocator), as the
command line does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import optree  # noqa: E402
from common import (  # noqa: E402
    CONFIGS,
    batch_for,
    bench_device,
    cache_env,
    machine,
    median_seconds,
    merge_caches,
    peak_memory_mb,
    sync,
    write_section,
)

from minifn import init_params, init_state, optim  # noqa: E402
from minifn.allocator import keep_freed_memory  # noqa: E402
from minifn.step import make_train_step  # noqa: E402
from minifn.sweep import make_sweep_step, sweep_states  # noqa: E402

BASE_LR, WEIGHT_DECAY = 1e-3, 0.01


def lrs(k: int) -> list[float]:
    """K learning rates spaced evenly in log from BASE_LR / 10 to BASE_LR * 10."""
    return [BASE_LR * 10 ** (-1 + 2 * i / max(k - 1, 1)) for i in range(k)]


def build(variant: str, config_name: str, k: int):
    """(one round: K optimizer steps of every member, its state bytes) for 'sweep', 'sweep_flash' (attention
    left to SDPA's choice of kernel instead of the math form a CPU sweep runs) or 'sequential'."""
    config, batch_size = CONFIGS[config_name]
    device = bench_device()
    tx = optim.adamw(lr=BASE_LR, weight_decay=WEIGHT_DECAY)
    params = init_params(config, seed=0, device=device)
    batch = batch_for(config, batch_size)
    if variant.startswith("sweep"):
        holder = [sweep_states(params, tx, [{"lr": lr} for lr in lrs(k)])]
        math_attention = False if variant == "sweep_flash" else None
        step = make_sweep_step(config, tx, math_attention=math_attention, compile="on", device=device)

        def one_round():
            holder[0], _ = step(holder[0], batch)
    else:
        states = [init_state(params, tx) for _ in range(k)]
        holder = [s._replace(opt_state=optim.set_hyperparams(s.opt_state, lr=lr)) for s, lr in zip(states, lrs(k))]
        step = make_train_step(config, tx, compile="on", device=device)

        def one_round():
            for i in range(k):
                holder[i], _ = step(holder[i], batch)

    state_bytes = sum(x.numel() * x.element_size() for x in optree.tree_leaves(holder))
    return one_round, state_bytes


def worker(variant: str, config_name: str, k: int, repeats: int) -> dict:
    """A variant alone in this process: compile time, step time, peak memory."""
    one_round, state_bytes = build(variant, config_name, k)
    start = time.perf_counter()
    one_round()
    sync()
    compile_s = time.perf_counter() - start
    one_round()
    return {"compile_s": compile_s, "round_s": median_seconds(one_round, repeats), "peak_memory_mb": peak_memory_mb(),
            "state_mb": state_bytes / 2**20}


def interleaved(config_name: str, k: int, rounds: int, flash: bool) -> dict:
    """Both variants (and, if flash, the sweep with SDPA's own attention kernel) in one process, stepping in
    turn; the medians of their rounds."""
    names = ("sweep", "sequential") + (("sweep_flash",) if flash else ())
    variants = {v: build(v, config_name, k)[0] for v in names}
    for one_round in variants.values():
        one_round()
        one_round()
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, one_round in variants.items():
            times[v].append(median_seconds(one_round, 1))
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def run_child(args: list[str], cache: str) -> dict:
    """Run this script with args in a new process on the inductor cache folder cache (if it is empty, the
    first call is a cold compile); its last line of output, as JSON."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **cache_env(cache)}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(config_name: str, k: int, alone: dict, together: dict, command: str) -> str:
    config, batch_size = CONFIGS[config_name]
    memory = "peak GPU memory" if bench_device().type == "cuda" else "peak RSS"
    sweep, seq = alone["sweep"], alone["sequential"]
    one_run = {**seq, "peak_memory_mb": alone["single"]["peak_memory_mb"], "state_mb": alone["single"]["state_mb"]}
    ratio = together["sequential"] / together["sweep"]
    flash = ""
    if "sweep_flash" in together:
        flash = f"""
Attention in the sweep: SDPA's math form (what a CPU sweep runs, minifn.sweep.math_attention_pays) \
{together['sweep'] * 1e3:.1f} ms per round against {together['sweep_flash'] * 1e3:.1f} ms with SDPA's own choice, \
the flash kernel, which vmap runs once per member (interleaved): **{together['sweep_flash'] / together['sweep']:.2f}x**.
"""
    return f"""## Sweep

Machine: {machine()}

Command: `{command}`

{k} learning rates ({', '.join(f'{lr:.1e}' for lr in lrs(k))}; AdamW, weight decay {WEIGHT_DECAY}), {config_name} \
config (embed {config.embed_dim}, {config.num_layers} layers, vocab {config.vocab_size}, seq {config.max_seq_len}, \
batch {batch_size}), every member on the same batch: one compiled `make_sweep_step` over the {k} stacked states \
versus {k} calls of one compiled `train_step` on {k} states, stepping in turn in one process. Every process \
keeps freed memory (`minifn.allocator`), as `minifn sweep` and `minifn train` do.

| | sweep, one step | {k} runs in turn | ratio |
|---|---|---|---|
| time per round of {k} optimizer steps, interleaved (ms) | {together['sweep'] * 1e3:.1f} | \
{together['sequential'] * 1e3:.1f} | **{ratio:.2f}x** |
| time per round, own process (ms) | {sweep['round_s'] * 1e3:.1f} | {seq['round_s'] * 1e3:.1f} | \
{seq['round_s'] / sweep['round_s']:.2f}x |
| first call, cold compile included (s), own process | {sweep['compile_s']:.1f} | {seq['compile_s']:.1f} | |
{flash}
Memory ({memory}, each in its own process): the sweep {sweep['peak_memory_mb']:.0f} MB; one run alone \
{one_run['peak_memory_mb']:.0f} MB, so {k} separate runs {k * one_run['peak_memory_mb']:.0f} MB \
({sweep['peak_memory_mb'] / (k * one_run['peak_memory_mb']):.2f}x of that for the sweep). State \
(parameters and optimizer): {sweep['state_mb']:.1f} MB for the sweep, {one_run['state_mb']:.1f} MB per run.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds, no flash-attention row")
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--k", type=int, default=8, help="members (learning rates)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="[cuda when present]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "CONFIG", "K", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", nargs=4, metavar=("CONFIG", "K", "ROUNDS", "FLASH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device:
        os.environ["MINIFN_BENCH_DEVICE"] = args.device  # the worker processes inherit it
    if args.worker or args.interleaved:
        # as `minifn sweep` runs (every command does this): a member's leaves are K times a run's, and glibc's
        # default malloc maps such blocks afresh, page faults included, at every step
        keep_freed_memory()
    if args.worker:
        variant, name, k, repeats = args.worker
        print(json.dumps(worker(variant, name, int(k), int(repeats))))
        return
    if args.interleaved:
        name, k, rounds, flash = args.interleaved
        print(json.dumps(interleaved(name, int(k), int(rounds), flash == "1")))
        return
    repeats, rounds = (3, 5) if args.quick else (10, 20)
    with tempfile.TemporaryDirectory() as tmp:
        caches = {v: os.path.join(tmp, v) for v in ("sweep", "sequential", "single")}  # each compiles cold
        alone = {v: run_child(["--worker", v, args.config, str(args.k), str(repeats)], caches[v])
                 for v in ("sweep", "sequential")}
        # one run alone compiles cold as well, so that its peak memory is measured as the sweep's is
        alone["single"] = run_child(["--worker", "sequential", args.config, "1", str(repeats)], caches["single"])
        shared = os.path.join(tmp, "all")
        merge_caches([caches["sweep"], caches["sequential"]], shared)  # the interleaved process loads both
        flash = bench_device().type == "cpu" and not args.quick  # on a GPU the sweep takes SDPA's choice anyway
        together = run_child(["--interleaved", args.config, str(args.k), str(rounds), str(int(flash))], shared)
    command = ("python benchmarks/sweep.py " + " ".join(sys.argv[1:])).strip()
    text = report(args.config, args.k, alone, together, command)
    write_section(args.output, "sweep", text)
    print(text)


if __name__ == "__main__":
    main()
