"""Sweep benchmark: K learning rates trained in one compiled, vmapped step against K compiled runs in turn.

    python benchmarks/sweep.py                 # K = 8, tiny config, writes its section of RESULTS.md
    python benchmarks/sweep.py --quick         # fewer rounds, no flash-attention row
    python benchmarks/sweep.py --config seed --k 4 --device cuda

Speed: one process builds both (the sweep: minifn.sweep.make_sweep_step over K stacked AdamW states whose
learning rates differ, written in place as `minifn sweep` runs it; the sequential runs: one compiled
train_step called on each of K states) and steps them round-robin, so machine noise hits both alike; the
ratio is of medians. Several such processes run one after another (--processes): on a shared 2-core machine
the same two steps compare differently from one process to the next, so the report gives each ratio and
their median. Memory: each variant in its own process (peak RSS on a CPU, the allocator's peak on a GPU),
the sweep against one run, which K separate runs would need K times over. Every process keeps freed memory
(minifn.allocator), as the command line does.
"""

from __future__ import annotations

import argparse
import json
import os
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
    machine,
    median_seconds,
    merge_caches,
    peak_memory_mb,
    run_script,
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
    left to SDPA's choice of kernel instead of the math form a CPU sweep runs), 'sweep_pure' (a new state
    each step, not written in place) or 'sequential'."""
    config, batch_size = CONFIGS[config_name]
    device = bench_device()
    tx = optim.adamw(lr=BASE_LR, weight_decay=WEIGHT_DECAY)
    params = init_params(config, seed=0, device=device)
    batch = batch_for(config, batch_size)
    if variant.startswith("sweep"):
        holder = [sweep_states(params, tx, [{"lr": lr} for lr in lrs(k)])]
        math_attention = False if variant == "sweep_flash" else None
        step = make_sweep_step(config, tx, math_attention=math_attention, inplace=variant != "sweep_pure",
                               compile="on", device=device)

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


def interleaved(config_name: str, k: int, rounds: int, names: list[str]) -> dict:
    """The variants named in one process, stepping in turn; the medians of their rounds."""
    variants = {v: build(v, config_name, k)[0] for v in names}
    for one_round in variants.values():
        one_round()
        one_round()
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, one_round in variants.items():
            times[v].append(median_seconds(one_round, 1))
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def report(config_name: str, k: int, alone: dict, runs: list[dict], extras: dict | None, command: str) -> str:
    config, batch_size = CONFIGS[config_name]
    memory = "peak GPU memory" if bench_device().type == "cuda" else "peak RSS"
    sweep, seq = alone["sweep"], alone["sequential"]
    one_run = {**seq, "peak_memory_mb": alone["single"]["peak_memory_mb"], "state_mb": alone["single"]["state_mb"]}
    ratios = sorted(r["sequential"] / r["sweep"] for r in runs)
    together = sorted(runs, key=lambda r: r["sequential"] / r["sweep"])[len(runs) // 2]  # the median ratio's run
    ratio = together["sequential"] / together["sweep"]
    each = ", ".join(f"{r:.2f}x" for r in ratios)
    spread = "" if len(runs) == 1 else f" (the median of {len(runs)} processes: {each})"
    flash = ""
    if extras:
        flash = f"""
Attention in the sweep: SDPA's math form (what a CPU sweep runs, minifn.sweep.math_attention_pays) \
{extras['sweep'] * 1e3:.1f} ms per round against {extras['sweep_flash'] * 1e3:.1f} ms with SDPA's own choice, \
the flash kernel, which vmap runs once per member: **{extras['sweep_flash'] / extras['sweep']:.2f}x**.

Writing the new states in place: {extras['sweep'] * 1e3:.1f} ms per round against {extras['sweep_pure'] * 1e3:.1f} \
ms for the pure sweep, which returns new tensors: **{extras['sweep_pure'] / extras['sweep']:.2f}x**. (These three \
sweeps step in turn in a process of their own, without the runs in turn.)
"""
    return f"""## Sweep

Machine: {machine()}

Command: `{command}`

{k} learning rates ({', '.join(f'{lr:.1e}' for lr in lrs(k))}; AdamW, weight decay {WEIGHT_DECAY}), {config_name} \
config (embed {config.embed_dim}, {config.num_layers} layers, vocab {config.vocab_size}, seq {config.max_seq_len}, \
batch {batch_size}), every member on the same batch: one compiled `make_sweep_step` over the {k} stacked states \
versus {k} calls of one compiled `train_step` on {k} states, stepping in turn in one process. The sweep \
writes its new states into the old ones (`inplace=True`), as `minifn sweep` does; the runs in turn use the pure \
step, which at this size is faster than the donated one. Every process keeps freed memory (`minifn.allocator`), \
as `minifn sweep` and `minifn train` do. Interleaved ratio{spread}.

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
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds, no flash-attention or pure rows")
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--k", type=int, default=8, help="members (learning rates)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="[cuda when present]")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per interleaved process [200; --quick 20]")
    parser.add_argument("--processes", type=int, default=None, help="interleaved processes, in turn [3; --quick 1]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "CONFIG", "K", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", nargs=4, metavar=("CONFIG", "K", "ROUNDS", "VARIANTS"), help=argparse.SUPPRESS)
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
        name, k, rounds, variants = args.interleaved
        print(json.dumps(interleaved(name, int(k), int(rounds), variants.split(","))))
        return
    repeats, rounds, processes = (3, 20, 1) if args.quick else (10, 200, 3)
    rounds, processes = args.rounds or rounds, args.processes or processes
    cpu_extras = bench_device().type == "cpu" and not args.quick
    with tempfile.TemporaryDirectory() as tmp:
        caches = {v: os.path.join(tmp, v) for v in ("sweep", "sequential", "single")}  # each compiles cold
        alone = {v: run_script(__file__, ["--worker", v, args.config, str(args.k), str(repeats)], caches[v])
                 for v in ("sweep", "sequential")}
        # one run alone compiles cold as well, so that its peak memory is measured as the sweep's is
        alone["single"] = run_script(__file__, ["--worker", "sequential", args.config, "1", str(repeats)],
                                     caches["single"])
        shared = os.path.join(tmp, "all")
        merge_caches([caches["sweep"], caches["sequential"]], shared)  # the interleaved process loads both
        interleave = lambda names: run_script(  # noqa: E731
            __file__, ["--interleaved", args.config, str(args.k), str(rounds), ",".join(names)], shared)
        runs = [interleave(["sweep", "sequential"]) for _ in range(processes)]
        # how the sweep's attention and writing in place pay, on a CPU (on a GPU it takes SDPA's choice anyway)
        extras = interleave(["sweep", "sweep_flash", "sweep_pure"]) if cpu_extras else None
    command = ("python benchmarks/sweep.py " + " ".join(sys.argv[1:])).strip()
    text = report(args.config, args.k, alone, runs, extras, command)
    write_section(args.output, "sweep", text)
    print(text)


if __name__ == "__main__":
    main()
