"""Swapping parameter trees: N trees through one compiled apply, and K models in one vmapped step.

    python benchmarks/swap.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["MINIFN_BENCH_DEVICE"] = "cpu"  # a CPU benchmark: its trees and batches stay on the CPU

from common import CONFIGS, batch_for, machine, median_seconds, write_section  # noqa: E402

from minifn import apply, init_params, init_state, optim, stack_trees, train_step  # noqa: E402
from minifn.model import skeleton  # noqa: E402


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def swap_cost(config_name: str, n_trees: int, repeats: int) -> dict:
    """Median forward time with one tree versus a different tree every call, and the graphs compiled."""
    config, batch_size = CONFIGS[config_name]
    skeleton(config)
    forward = torch.compile(apply, fullgraph=True, dynamic=False)
    trees = [init_params(config, seed) for seed in range(n_trees)]
    x, _ = batch_for(config, batch_size)
    with torch.no_grad():
        forward(trees[0], x, config)
        before = graphs()
        same = median_seconds(lambda: forward(trees[0], x, config), repeats)
        turn = iter(range(10**9))
        swapped = median_seconds(lambda: forward(trees[next(turn) % n_trees], x, config), repeats)
    return {"same_ms": same * 1e3, "swapped_ms": swapped * 1e3, "new_graphs": graphs() - before}


def ensemble(config_name: str, k: int, repeats: int) -> dict:
    """K models trained in one vmapped compiled step versus K calls of the compiled single-model step."""
    config, batch_size = CONFIGS[config_name]
    skeleton(config)
    tx = optim.adamw(lr=1e-3, weight_decay=0.01)
    single = torch.compile(functools.partial(train_step, config=config, optimizer=tx), fullgraph=True)
    together = torch.compile(torch.func.vmap(functools.partial(train_step, config=config, optimizer=tx)),
                             fullgraph=True)
    states = [init_state(init_params(config, s), tx) for s in range(k)]
    x, y = batch_for(config, batch_size)
    stacked, xs, ys = stack_trees(states), x.expand(k, *x.shape).clone(), y.expand(k, *y.shape).clone()
    holder = {"states": states, "stacked": stacked}

    def sequential():
        holder["states"] = [single(s, (x, y))[0] for s in holder["states"]]

    def vmapped():
        holder["stacked"] = together(holder["stacked"], (xs, ys))[0]

    start = time.perf_counter()
    sequential()
    compile_single = time.perf_counter() - start
    start = time.perf_counter()
    vmapped()
    compile_vmapped = time.perf_counter() - start
    seq, vm = [], []
    for _ in range(repeats):  # interleaved, so noise hits both
        seq.append(median_seconds(sequential, 1))
        vm.append(median_seconds(vmapped, 1))
    seq_s, vm_s = sorted(seq)[len(seq) // 2], sorted(vm)[len(vm) // 2]
    return {"sequential_ms": seq_s * 1e3, "vmapped_ms": vm_s * 1e3, "ratio": seq_s / vm_s,
            "compile_single_s": compile_single, "compile_vmapped_s": compile_vmapped}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default="seed", help="config for the swap measurement")
    parser.add_argument("--ensemble-config", default="tiny")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    s = swap_cost(args.config, 4, repeats)
    e = ensemble(args.ensemble_config, args.k, repeats)
    ec = CONFIGS[args.ensemble_config][0]
    text = f"""## Swapping parameter trees

Machine: {machine()}

Command: `python benchmarks/swap.py {' '.join(sys.argv[1:])}`

One compiled `apply` ({args.config} config, forward only) called with the same tree every time, then with
one of 4 trees (different seeds) in turn: {s['same_ms']:.1f} ms vs {s['swapped_ms']:.1f} ms per call,
{s['new_graphs']} new graphs compiled. A swap costs nothing beyond the call: parameters are inputs.

{args.k} models ({args.ensemble_config} config: embed {ec.embed_dim}, {ec.num_layers} layers, vocab {ec.vocab_size})
trained by one `torch.func.vmap`ped compiled `train_step` versus {args.k} calls of the compiled
single-model step, interleaved: {e['vmapped_ms']:.1f} ms vs {e['sequential_ms']:.1f} ms per round of
{args.k} steps, **{e['ratio']:.2f}x** (compile: {e['compile_vmapped_s']:.0f} s vmapped,
{e['compile_single_s']:.0f} s single).
"""
    write_section(args.output, "swap", text)
    print(text)


if __name__ == "__main__":
    main()
