"""Train-step benchmark: minifn's compiled functional step against plain PyTorch.

    python benchmarks/train_step.py            # seed and bench configs (and large on a GPU), writes RESULTS.md
    python benchmarks/train_step.py --quick    # fewer steps
    python benchmarks/train_step.py --device cuda --configs large
    python benchmarks/train_step.py --variants a,a_fused,b,c,d   # a subset: a section of its own

Each variant runs twice in its own process with an inductor cache of its own, empty at first (cold
compile, step time, peak RSS), then again on that cache, now warm (warm compile). Because the machines
are shared and noisy, the speed ratios quoted are from one more process that steps all variants
round-robin.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    COMPILED,
    CONFIGS,
    VARIANTS,
    bench_device,
    build,
    machine,
    matmul_peak_flops,
    median_seconds,
    merge_caches,
    peak_memory_mb,
    round_robin,
    run_script,
    step_flops,
    sync,
    write_section,
)


def worker(variant: str, config_name: str, repeats: int) -> dict:
    config, batch_size = CONFIGS[config_name]
    step = build(variant, config, batch_size)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    step()
    return {"first_step_s": first, "step_s": median_seconds(step, repeats), "peak_memory_mb": peak_memory_mb()}


def interleaved(config_name: str, rounds: int, variants: list[str]) -> dict:
    times = round_robin(config_name, variants, rounds)
    return {"step_s": {v: statistics.median(t["seconds"]) for v, t in times.items()},
            "peak_flops": matmul_peak_flops()}


def measure(config_names: list[str], repeats: int, rounds: int, variants: list[str], jobs: int = 1) -> dict:
    results = {}
    for name in config_names:
        with tempfile.TemporaryDirectory() as tmp:
            caches = {v: os.path.join(tmp, v) for v in variants}  # each variant's cold compile starts from nothing

            def cold_and_warm(v, name=name, caches=caches):
                cold = run_script(__file__, ["--worker", v, name, str(repeats)], caches[v])
                warm = run_script(__file__, ["--worker", v, name, str(repeats)], caches[v])
                print(f"{name} {v}: {cold}", file=sys.stderr, flush=True)
                return {"cold": cold, "warm": warm}

            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                per_variant = dict(zip(variants, pool.map(cold_and_warm, variants)))
            shared = os.path.join(tmp, "all")
            merge_caches(caches.values(), shared)  # no variant compiles twice
            together = run_script(__file__, ["--interleaved", name, str(rounds), ",".join(variants)], shared)
        results[name] = {"variants": per_variant, "interleaved": together}
    return results


def report(results: dict, command: str, title: str = "## Train step", jobs: int = 1) -> str:
    memory = "peak GPU memory MB" if bench_device().type == "cuda" else "peak RSS MB"
    lines = [title, "", f"Machine: {machine()}", "", f"Command: `{command}`", "",
             "Ratios are speed relative to (a), from the interleaved process (all variants stepping round-robin",
             "in one process, so machine noise hits them alike). Step times and memory come from each variant's own",
             "process; cold compile is the first step with an empty inductor cache of its own, warm the same with it",
             "filled" + (f" ({jobs} variants' processes at a time, so compile times are upper bounds)" if jobs > 1
                         else "") + ".",
             "MFU = model FLOPs per step / step time / float32 matmul FLOP/s measured in the same run",
             "(so bfloat16 rows, whose matmuls run faster than float32's peak, go over 100%);",
             "model FLOPs per token = 6 x matmul parameters + 6 x layers x T x heads x head_dim (causal).", ""]
    for name, r in results.items():
        config, batch_size = CONFIGS[name]
        tokens = batch_size * config.max_seq_len
        inter = r["interleaved"]
        flops, peak = step_flops(config, batch_size), inter["peak_flops"]
        base = inter["step_s"]["a"]
        lines += [f"### {name}: vocab {config.vocab_size}, embed {config.embed_dim}, {config.num_layers} layers, "
                  f"{config.num_heads} heads x {config.head_dim}, ff {config.ff_dim}, seq {config.max_seq_len}, "
                  f"batch {batch_size} ({flops / 1e9:.1f} GFLOP/step; matmul peak {peak / 1e9:.0f} GFLOP/s)", "",
                  "| variant | ratio to (a), interleaved | step ms, interleaved | tokens/s | MFU "
                  f"| step ms, own process | cold compile s | warm compile s | {memory} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in r["variants"]:
            label = VARIANTS[v]
            step = inter["step_s"][v]
            own = r["variants"][v]
            compiled = v in COMPILED
            cold = f"{own['cold']['first_step_s']:.1f}" if compiled else "-"
            warm = f"{own['warm']['first_step_s']:.1f}" if compiled else "-"
            lines.append(f"| ({v}) {label} | {base / step:.2f} | {step * 1e3:.1f} | {tokens / step:.0f} | "
                         f"{flops / step / peak:.0%} | {own['warm']['step_s'] * 1e3:.1f} | {cold} | {warm} | "
                         f"{own['warm']['peak_memory_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from {', '.join(CONFIGS)} [seed,bench; and large on a GPU]")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}; a is the baseline [all]")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="[cuda when present]")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants' own processes run at a time (a GPU machine's many cores) [1]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "CONFIG", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", nargs=3, metavar=("CONFIG", "ROUNDS", "VARIANTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device:
        os.environ["MINIFN_BENCH_DEVICE"] = args.device  # the worker processes inherit it
    configs = args.configs or ("seed,bench,large" if bench_device().type == "cuda" else "seed,bench")
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return
    if args.interleaved:
        print(json.dumps(interleaved(args.interleaved[0], int(args.interleaved[1]), args.interleaved[2].split(","))))
        return
    repeats, rounds = (3, 3) if args.quick else (10, 15)
    variants = args.variants.split(",")
    if "a" not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: a comma-separated list from {', '.join(VARIANTS)} that includes a")
    results = measure(configs.split(","), repeats, rounds, variants, args.jobs)
    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
    # A subset of variants, or a GPU (whose configs differ), keeps the CPU's full table and gets a section
    # of its own.
    section = ["train_step"] + (["cuda", *configs.split(",")] if bench_device().type == "cuda" else [])
    section += variants if variants != list(VARIANTS) else []
    title = "## Train step" + (" on CUDA" if bench_device().type == "cuda" else "")
    title += f": {', '.join(variants)}" if variants != list(VARIANTS) else ""
    text = report(results, command.strip(), title, args.jobs)
    write_section(args.output, "-".join(section), text)
    print(text)


if __name__ == "__main__":
    main()
