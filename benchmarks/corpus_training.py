"""`minifn train` on a prepared corpus: peak memory against corpus size, and time from launch to the first step.

    python benchmarks/corpus_training.py           # tinyshakespeare x100 (36M tokens) against x3 (1M tokens)
    python benchmarks/corpus_training.py --quick   # x6 against x3

Both corpora are prepared at run time in a temporary folder (never committed). Each run is its own
`minifn train` process (the seed model's shape, --compile off, a step budget); its peak RSS comes from
os.wait4, and the first step is the first per-batch line that --verbose prints, timed from launch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write_section  # noqa: E402

from data import make_corpus, run_measured  # noqa: E402

MODEL = ["--num-layers", "4", "--num-heads", "8", "--head-dim", "32", "--embed-dim", "256", "--ff-dim", "1024",
         "--max-seq-len", "128", "--batch-stride", "64", "--batch-size", "2", "--compile", "off"]


def train(corpus: Path, checkpoint: Path, steps: int) -> dict:
    """Peak RSS and seconds from launch to the first step's line, of one `minifn train` process."""
    args = [sys.executable, "-m", "minifn", "train", "--dataset", str(corpus), "--model", str(checkpoint), *MODEL,
            "--max-steps", str(steps), "--num-epochs", "1000", "--verbose"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("[Epoch: 1] [Batch:"):
            first = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(args)} failed:\n{''.join(lines)}")
    tokens = next(line for line in lines if line.startswith("Training")).split(" tokens of ")[0].split()[-1]
    return {"tokens": int(tokens), "first_step_s": first, "seconds": time.perf_counter() - start,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    copies = [3, 6] if args.quick else [3, 100]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for n in copies:
            corpus = folder / f"x{n}"
            run_measured([sys.executable, "-m", "minifn", "prepare", str(make_corpus(folder, n)), "--output",
                          str(corpus), "--val-fraction", "0.01"])
            rows.append((n, train(corpus, folder / f"x{n}.pt", args.steps)))
    small, large = rows[0][1], rows[-1][1]
    table = "\n".join(f"| tinyshakespeare x{n} | {r['tokens'] / 1e6:.1f}M | {r['peak_rss_mb']:.0f} | "
                      f"{r['first_step_s']:.2f} | {r['seconds']:.1f} |" for n, r in rows)
    text = f"""## Training from a prepared corpus

Machine: {machine()}

Command: `python benchmarks/corpus_training.py{' --quick' if args.quick else ''}`

`minifn train --dataset DIR` with the seed model's shape, `--compile off`, {args.steps} steps; each run is its
own process. The first step is timed from launch to the first per-batch line.

| corpus | training tokens | peak RSS MB | first step s | whole run s |
|---|---|---|---|---|
{table}

Peak RSS of the large corpus over the small one: **{large['peak_rss_mb'] / small['peak_rss_mb']:.3f}x** for
{large['tokens'] / small['tokens']:.0f}x the tokens.
"""
    write_section(args.output, "corpus_training", text)
    print(text)


if __name__ == "__main__":
    main()
