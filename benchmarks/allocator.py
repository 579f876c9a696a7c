"""What keeping freed memory in the process (minifn.allocator, set by the command line) buys a training step.

    python benchmarks/allocator.py              # seed and bench steps, and the tutorial's command; RESULTS.md
    python benchmarks/allocator.py --configs tiny --no-tutorial   # a quick check that it runs
    python benchmarks/allocator.py --configs seed --variants a_fused,d --no-tutorial   # section of its own

Each measurement is its own process, with glibc's default malloc or with keep_freed_memory() called
first; the two alternate, --repeats times each (2), and the medians are reported (the tutorial: one run each). Step
times are for the eager variants of benchmarks/train_step.py: (a) nn.Module + torch.optim.AdamW and (c)
minifn's donated step (by default; --variants takes any of them, compiled ones included, and writes a
section of its own; with a_fused and d among them, processes that step those two in turn, --repeats per setting, give
the compiled step's ratio to fused AdamW, as own-process times are too noisy to compare). The tutorial row
runs `minifn train` with the README's tutorial flags and --compile off, end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    CONFIGS,
    VARIANTS,
    build,
    machine,
    median_seconds,
    peak_memory_mb,
    run_script,
    write_section,
)

MODES = ("default", "keep")
STEPS = {"seed": 20, "bench": 6, "tiny": 3}  # timed steps per process
TUTORIAL = ["--batch-size", "2", "--batch-stride", "8", "--num-epochs", "100", "--num-layers", "4", "--num-heads",
            "8", "--head-dim", "16", "--embed-dim", "256", "--lr", "1e-4", "--scheduler", "none", "--bias",
            "--compile", "off", "--dtype", "float32"]
MINI_OWL = HERE.parent.parent / "shared" / "data" / "mini-owl.md"
# The command line calls keep_freed_memory() itself; the default runs replace it with a no-op first.
RUN_CLI = ("import sys, minifn.allocator as a\n"
           "if sys.argv.pop(1) == 'default':\n    a.keep_freed_memory = lambda: False\n"
           "from minifn.cli import main\nsys.argv[0] = 'minifn'\nmain()")


def worker(mode: str, variant: str, name: str) -> dict:
    if mode == "keep":
        from minifn.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc's malloc thresholds could not be set"
    config, batch_size = CONFIGS[name]
    step = build(variant, config, batch_size)
    step(), step()
    return {"step_s": median_seconds(step, STEPS[name]), "peak_memory_mb": peak_memory_mb()}


def together(mode: str, name: str, variants: str) -> dict:
    """The variants stepping round-robin in one process (noise hits them alike): each one's median step."""
    if mode == "keep":
        from minifn.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc's malloc thresholds could not be set"
    config, batch_size = CONFIGS[name]
    steps = {v: build(v, config, batch_size) for v in variants.split(",")}
    for step in steps.values():
        step(), step()
    times = {v: [] for v in steps}
    for _ in range(STEPS[name]):
        for v, step in steps.items():
            times[v].append(median_seconds(step, 1))
    return {v: statistics.median(t) for v, t in times.items()}


def tutorial(mode: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", RUN_CLI, mode, "train", "--dataset", str(MINI_OWL), *TUTORIAL,
                        "--model", str(Path(folder) / "mini.pt")], check=True, capture_output=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench", help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--no-tutorial", action="store_true", help="skip the end-to-end tutorial run")
    parser.add_argument("--variants", default="a,c", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=2, help="processes per variant and malloc setting [2]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--together", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.together:
        print(json.dumps(together(*args.together)))
        return
    rows, variants = [], args.variants.split(",")
    own_section = variants != ["a", "c"]
    for name in args.configs.split(","):
        for variant in variants:
            runs = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    runs[mode].append(run_script(__file__, ["--worker", mode, variant, name]))
            step = {m: statistics.median(r["step_s"] for r in runs[m]) for m in MODES}
            rss = {m: max(r["peak_memory_mb"] for r in runs[m]) for m in MODES}
            rows.append(f"| {name} | ({variant}) {VARIANTS[variant]} | {step['default'] * 1e3:.1f} | "
                        f"{step['keep'] * 1e3:.1f} | {step['default'] / step['keep']:.2f}x | {rss['default']:.0f} | "
                        f"{rss['keep']:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    title = "## Keeping freed memory (minifn.allocator)" + (f": {', '.join(variants)}" if own_section else "")
    lines = [title, "", f"Machine: {machine()}", "",
             f"Command: `{' '.join(['python benchmarks/allocator.py', *sys.argv[1:]])}`", "",
             "Steps in their own process, with glibc's default malloc or with `keep_freed_memory()` (what the",
             f"command line sets); processes alternate, {args.repeats} of each, medians.", "",
             "| config | variant | step ms, default | step ms, kept | speed-up | peak RSS MB, default | "
             "peak RSS MB, kept |", "|---|---|---|---|---|---|---|", *rows]
    if "a_fused" in variants and "d" in variants:  # a ratio of variants: from processes that step both in turn
        ratios = []
        for name in args.configs.split(","):
            for mode in MODES:
                runs = [run_script(__file__, ["--together", mode, name, "a_fused,d"]) for _ in range(args.repeats)]
                ratios.append(f"{name}, {'default malloc' if mode == 'default' else 'freed memory kept'}: "
                              + " and ".join(f"{r['a_fused'] / r['d']:.2f}x" for r in runs))
        lines += ["", "Compiled (d) against fused AdamW (a_fused), speed ratio in processes that step both in turn "
                      "(one figure per process): " + "; ".join(ratios) + "."]
    if not args.no_tutorial and MINI_OWL.exists():
        default, keep = (tutorial(mode) for mode in MODES)  # one run each: a run is 1,100 steps
        lines += ["", "The tutorial's command with `--compile off` (README flags, 100 epochs on mini-owl), end to "
                      f"end: {default:.0f} s with the default malloc, {keep:.0f} s kept ({default / keep:.2f}x)."]
    text = "\n".join(lines)
    write_section(args.output, f"allocator-{'-'.join(variants)}" if own_section else "allocator", text)
    print(text)


if __name__ == "__main__":
    main()
