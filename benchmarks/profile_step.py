"""Where the compiled step spends its time, and where its compile time goes.

    python benchmarks/profile_step.py [--configs seed,bench]
    python benchmarks/profile_step.py --configs tutorial --keep-freed-memory   # the allocator minifn train sets
    python benchmarks/profile_step.py --configs tutorial --variant d_bf16      # under bfloat16 autocast

Per-step time of minifn's compiled step (variant d, or --variant d_bf16) by category, from torch.profiler, and the
compile-time split (dynamo tracing, AOTAutograd, inductor) with a cold and a warm inductor cache. With glibc's
default malloc (as plain PyTorch runs), a kernel that writes a fresh large buffer also pays its page faults;
--keep-freed-memory profiles with minifn.allocator's setting, as `minifn train` runs.
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
os.environ["MINIFN_BENCH_DEVICE"] = "cpu"  # a CPU benchmark: its categories are CPU kernels

from common import CONFIGS, build, machine, matmul_peak_flops, run_script, step_flops, vector_level, write_section  # noqa: E402

from minifn.allocator import keep_freed_memory  # noqa: E402

CATEGORIES = [  # first match wins
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "_linear_pointwise")),  # MKL; oneDNN
    ("attention (SDPA)", ("scaled_dot_product",)),
    ("optimizer update", ("lerp", "fused_adam")),  # inductor's own update, or torch's fused kernel
    ("log-softmax / loss", ("log_softmax", "logsumexp")),
    ("other fused kernels", ("graph_",)),
]


def profile(config_name: str, variant: str = "d", steps: int = 3) -> dict:
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inductor_config.cpp.enable_kernel_profile = True  # one profiler row per generated kernel
    config, batch_size = CONFIGS[config_name]
    step = build(variant, config, batch_size)
    for _ in range(3):
        step()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    totals: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("## Call") or "Compiled Region" in event.key:
            continue
        category = next((c for c, keys in CATEGORIES if any(k in event.key for k in keys)), "everything else")
        if category == "matrix multiplies" and any(config.vocab_size in shape for shape in event.input_shapes):
            category = "matrix multiplies: the head"  # the V-way output layer's products
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return {"wall_s": wall, "totals": totals, "flops": step_flops(config, batch_size),
            "peak": matmul_peak_flops()}


def compile_split(config_name: str, variant: str = "d") -> dict:
    import torch

    config, batch_size = CONFIGS[config_name]
    step = build(variant, config, batch_size)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    rows = dict(line.rsplit(", ", 1) for line in
                torch._dynamo.utils.compile_times(repr="str", aggregate=True).splitlines() if ", " in line)

    def seconds(key):
        return float(rows.get(key, 0.0))

    # nested timers: compile_inner > call_user_compiler > create_aot_dispatcher_function > fw_compiler_base;
    # a step saved for the next run (minifn.precompiled) is compiled under fullgraph_capture instead
    if "fullgraph_capture" in rows:
        total, backend = seconds("fullgraph_capture"), seconds("create_aot_dispatcher_function")
    else:
        total, backend = seconds("_compile.compile_inner"), seconds("OutputGraph.call_user_compiler")
    aot, inductor = seconds("create_aot_dispatcher_function"), seconds("compile_fx.<locals>.fw_compiler_base")
    return {"first_step_s": first, "dynamo_s": total - backend, "aot_s": aot - inductor, "inductor_s": inductor}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--variant", default="d", choices=("d", "d_bf16"), help="minifn's compiled step [d]")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the process (minifn.allocator), as minifn train does")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, name, variant = args.child
        if args.keep_freed_memory and not keep_freed_memory():
            sys.exit("--keep-freed-memory: glibc's malloc settings cannot be changed in this process")
        print(json.dumps(profile(name, variant) if kind == "profile" else compile_split(name, variant)))
        return
    malloc = "freed memory kept (minifn.allocator)" if args.keep_freed_memory else "glibc's default malloc"
    lines = [f"## Where the time goes (compiled step, variant {args.variant}, {malloc})", "",
             f"Machine: {machine()}", "",
             f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`", ""]
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as cache:
            child = [name, args.variant]
            cold = run_script(__file__, ["--child", "compile", *child], cache)  # the cache starts empty
            warm = run_script(__file__, ["--child", "compile", *child], cache)
            kept = ["--keep-freed-memory"] if args.keep_freed_memory else []
            prof = run_script(__file__, ["--child", "profile", *child, *kept], cache)
        matmul = sum(seconds for category, seconds in prof["totals"].items() if category.startswith("matrix"))
        lines += [f"### {name}", "",
                  f"Step {prof['wall_s'] * 1e3:.0f} ms under the profiler; matmuls run at "
                  f"{prof['flops'] / max(matmul, 1e-9) / 1e9:.0f} GFLOP/s of model FLOPs "
                  f"(measured 1024x1024 float32 matmul peak {prof['peak'] / 1e9:.0f} GFLOP/s).", "",
                  "| category | ms per step | share |", "|---|---|---|"]
        total = sum(prof["totals"].values())
        for category, seconds in sorted(prof["totals"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {category} | {seconds * 1e3:.1f} | {seconds / total:.0%} |")
        lines += ["", "| compile | first step s | dynamo tracing s | AOTAutograd s | inductor s |",
                  "|---|---|---|---|---|"]
        for label, c in (("cold cache", cold), ("warm cache", warm)):
            lines.append(f"| {label} | {c['first_step_s']:.1f} | {c['dynamo_s']:.1f} | {c['aot_s']:.1f} | "
                         f"{c['inductor_s']:.1f} |")
        lines.append("")
    text = "\n".join(lines)
    name = "profile" + ("-kept" if args.keep_freed_memory else "") + ("" if args.variant == "d" else f"-{args.variant}")
    write_section(args.output, f"{name}-{vector_level()}", text)
    print(text)


if __name__ == "__main__":
    main()
