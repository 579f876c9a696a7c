"""Two train-step variants stepped in turn for many rounds: the spread of their speed ratio, round by round.

    python benchmarks/paired.py --config bench --variants b,d --rounds 36
    python benchmarks/paired.py --config bench --variants b,d --rounds 36 --keep-freed-memory   # as minifn train
    python benchmarks/paired.py --config tiny --variants a,d --rounds 4 --output /tmp/x.md   # a quick check

On these shared 2-core machines one step can take 0.85x or 1.25x of the next for no reason of its own, so
a median over 15 rounds (train_step.py's interleaved column) can miss by several percent. Here each round
times the first variant, then the second, in one process (so both see the same moment of the machine),
and the report gives the quartiles of the per-round ratios, the ratio of medians and of fastest steps,
and the page faults per step of each: with glibc's default malloc, as plain PyTorch runs, or with
--keep-freed-memory, the process-wide setting `minifn train` makes (minifn.allocator), for both variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, VARIANTS, machine, round_robin, vector_level, write_section  # noqa: E402

from minifn.allocator import keep_freed_memory  # noqa: E402


def report(config_name: str, variants: list[str], rounds: int, results: dict, command: str, malloc: str) -> str:
    base, other = variants
    b, o = results[base]["seconds"], results[other]["seconds"]
    ratios = [x / y for x, y in zip(b, o)]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    lines = [f"## Paired steps: {config_name}, ({other}) against ({base}), {vector_level()}", "",
             f"Machine: {machine()}", "", f"Command: `{command}`", "",
             f"{rounds} rounds, each stepping ({base}) then ({other}) in one process, {malloc}. Speed of "
             f"({other}) over ({base}), per round: quartiles {q1:.3f} / **{med:.3f}** / {q3:.3f}; ratio of medians "
             f"{statistics.median(b) / statistics.median(o):.3f}; of fastest steps {min(b) / min(o):.3f}.", "",
             "| variant | fastest ms | median ms | quartiles ms | page faults per step (median) |",
             "|---|---|---|---|---|"]
    for v in variants:
        s = results[v]["seconds"]
        lo, mid, hi = statistics.quantiles(s, n=4)
        lines.append(f"| ({v}) {VARIANTS[v]} | {min(s) * 1e3:.1f} | {mid * 1e3:.1f} | {lo * 1e3:.1f} - "
                     f"{hi * 1e3:.1f} | {statistics.median(results[v]['faults']):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", help=f"one of {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default="b,d", help="two, comma-separated: the base, then the other")
    parser.add_argument("--rounds", type=int, default=36)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the process for both variants, as minifn train does")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    if len(variants) != 2 or not set(variants) <= set(VARIANTS) or args.config not in CONFIGS or args.rounds < 2:
        parser.error(f"two variants from {', '.join(VARIANTS)}, a config from {', '.join(CONFIGS)}, 2+ rounds")
    if args.keep_freed_memory and not keep_freed_memory():
        sys.exit("--keep-freed-memory: glibc's malloc settings cannot be changed in this process")
    malloc = "freed memory kept (minifn.allocator)" if args.keep_freed_memory else "glibc's default malloc"
    results = round_robin(args.config, variants, args.rounds)
    command = f"python benchmarks/paired.py {' '.join(sys.argv[1:])}"
    text = report(args.config, variants, args.rounds, results, command, malloc)
    # one section per vector level: AVX2 and AVX-512 machines rank the variants differently
    kept = "-kept" if args.keep_freed_memory else ""
    write_section(args.output, f"paired-{args.config}-{'-'.join(variants)}-{vector_level()}{kept}", text)
    print(text)


if __name__ == "__main__":
    main()
