"""Data benchmark: `minifn prepare` throughput and memory against corpus size, and training fed from the
prepared shards on disk against from an in-memory tensor.

    python benchmarks/data.py            # 110 MB and 11 MB corpora (tinyshakespeare x100, x10), writes RESULTS.md
    python benchmarks/data.py --quick    # 2.2 MB and 1.1 MB, fewer steps

The corpora are made in a temporary folder at run time from ../shared/data/tinyshakespeare.txt (never
committed). Each `minifn prepare` runs in its own process, whose peak RSS comes from os.wait4. Reading
is compared on the same windows in the same (shuffled) order: batches per second alone, and steps per
second of the `seed` model's eager train step fed from each source round-robin, so machine noise hits
both alike. A last pair of processes reads one full shuffled epoch from each corpus and reports its
peak RSS, which must not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(HERE))

SEQ_LEN, STRIDE, BATCH = 256, 256, 8  # the reading pattern timed (seq 128, batch 2 for the train step)


def make_corpus(folder: Path, copies: int) -> Path:
    """tinyshakespeare repeated `copies` times, as one text file."""
    if not SHAKESPEARE.is_file():
        sys.exit(f"benchmarks/data.py needs {SHAKESPEARE}")
    text = SHAKESPEARE.read_bytes()
    path = folder / f"shakespeare_x{copies}.txt"
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(text)
    return path


def run_measured(args: list[str]) -> dict:
    """Run a command; its wall time, peak RSS (MB, from wait4) and output."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{output}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024, "output": output}


def measure_prepare(path: Path, output: Path) -> dict:
    result = run_measured([sys.executable, "-m", "minifn", "prepare", str(path), "--output", str(output),
                           "--val-fraction", "0.01"])
    own = re.search(r"([\d.]+) MB/s", result["output"])
    megabytes = path.stat().st_size / 1e6
    manifest = json.loads((output / "manifest.json").read_text())
    return {"megabytes": megabytes, "tokens": manifest["tokens"], "seconds": result["seconds"],
            "wall_mb_s": megabytes / result["seconds"], "command_mb_s": float(own.group(1)) if own else None,
            "peak_rss_mb": result["peak_rss_mb"]}


def epoch_worker(corpus_dir: str) -> dict:
    """Read one full shuffled epoch of batches from a prepared corpus; the peak RSS of doing so."""
    import resource

    from minifn.corpus import open_corpus
    from minifn.data import batches

    seq = open_corpus(corpus_dir).train
    start, count = time.perf_counter(), 0
    for _ in batches(seq, SEQ_LEN, STRIDE, BATCH, shuffle=True, seed=0):
        count += 1
    return {"batches": count, "seconds": time.perf_counter() - start, "tokens": len(seq),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def time_batches(sources: dict, batches_per_round: int, rounds: int) -> dict:
    """Seconds per batch from each source, round-robin over the same windows in the same order."""
    from minifn.data import batches

    iterators = {name: batches(seq, SEQ_LEN, STRIDE, BATCH, shuffle=True, seed=0) for name, seq in sources.items()}
    times = {name: [] for name in sources}
    for _ in range(rounds):
        for name, it in iterators.items():
            start = time.perf_counter()
            for _ in range(batches_per_round):
                next(it)
            times[name].append((time.perf_counter() - start) / batches_per_round)
    return {name: statistics.median(t) for name, t in times.items()}


def time_steps(sources: dict, steps_per_round: int, rounds: int) -> dict:
    """Seconds per train step of the seed config (eager) fed from each source, round-robin."""
    from common import CONFIGS

    from minifn import init_params, init_state, make_train_step, optim
    from minifn.data import batches

    config, batch_size = CONFIGS["seed"]
    tx = optim.adamw(lr=1e-3)
    step = make_train_step(config, tx, compile="off")
    states = {name: init_state(init_params(config, seed=0), tx) for name in sources}
    iterators = {name: batches(seq, config.max_seq_len, config.max_seq_len, batch_size, shuffle=True, seed=0)
                 for name, seq in sources.items()}
    for name in sources:  # warm up
        states[name], _ = step(states[name], next(iterators[name]))
    times = {name: [] for name in sources}
    for _ in range(rounds):
        for name, it in iterators.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                states[name], metrics = step(states[name], next(it))
            float(metrics["loss"])
            times[name].append((time.perf_counter() - start) / steps_per_round)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(copies: list[int], quick: bool) -> dict:
    import torch

    from minifn.corpus import open_corpus

    results = {"prepare": {}, "epoch": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not quick:  # what starting minifn costs alone (left out of the quick smoke run, to keep it short)
            results["import_rss_mb"] = run_measured([sys.executable, "-m", "minifn", "--help"])["peak_rss_mb"]
        for n in copies:
            path = make_corpus(tmp, n)
            results["prepare"][n] = measure_prepare(path, tmp / f"corpus_x{n}")
            print(f"prepare x{n}: {results['prepare'][n]}", file=sys.stderr, flush=True)
            path.unlink()
        for n in copies:
            result = run_measured([sys.executable, __file__, "--epoch-worker", str(tmp / f"corpus_x{n}")])
            results["epoch"][n] = json.loads(result["output"].strip().splitlines()[-1])
            print(f"epoch x{n}: {results['epoch'][n]}", file=sys.stderr, flush=True)
        disk = open_corpus(tmp / f"corpus_x{max(copies)}").train
        sources = {"memory map (shards on disk)": disk, "in-memory tensor": torch.from_numpy(disk[:])}
        rounds = 1 if quick else 15
        results["batch_s"] = time_batches(sources, 20 if quick else 500, rounds)
        results["step_s"] = time_steps(sources, 1 if quick else 10, rounds)
    return results


def report(results: dict, command: str) -> str:
    from common import machine

    lines = ["## Data: prepare and reading from shards", "", f"Machine: {machine()}", "", f"Command: `{command}`", "",
             "`minifn prepare FILE --output DIR --val-fraction 0.01` (Mistral's tokenizer) on tinyshakespeare repeated",
             "N times, each in its own process. Wall MB/s includes starting Python and importing torch; the command's",
             "own MB/s is from its summary line. Peak RSS from wait4" + (
                 f"; for comparison, `minifn --help` peaks at {results['import_rss_mb']:.0f} MB."
                 if "import_rss_mb" in results else "."), "",
             "| corpus | MB | tokens | wall s | wall MB/s | command MB/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for n, r in results["prepare"].items():
        own = f"{r['command_mb_s']:.1f}" if r["command_mb_s"] else "-"
        lines.append(f"| tinyshakespeare x{n} | {r['megabytes']:.1f} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{r['wall_mb_s']:.2f} | {own} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"One full shuffled epoch of batches (seq {SEQ_LEN}, stride {STRIDE}, batch {BATCH}) read from each "
              "prepared corpus in its own process:", "",
              "| corpus | train tokens | batches | seconds | peak RSS MB |", "|---|---|---|---|---|"]
    for n, r in results["epoch"].items():
        lines.append(f"| tinyshakespeare x{n} | {r['tokens']} | {r['batches']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    names = list(results["batch_s"])
    disk, memory = names
    lines += ["", "Reading the same windows in the same order (median of interleaved rounds), and the `seed` model's",
              "eager train step fed from each:", "",
              "| source | batch us | batches/s | train step ms | steps/s |", "|---|---|---|---|---|"]
    for name in names:
        b, s = results["batch_s"][name], results["step_s"][name]
        lines.append(f"| {name} | {b * 1e6:.0f} | {1 / b:.0f} | {s * 1e3:.1f} | {1 / s:.2f} |")
    cost = results["step_s"][disk] / results["step_s"][memory] - 1
    lines += ["", f"Steps per second fed from the shards cost {cost:+.1%} against the in-memory tensor.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2.2 MB and 1.1 MB corpora, fewer rounds")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--epoch-worker", metavar="CORPUS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_worker:
        print(json.dumps(epoch_worker(args.epoch_worker)))
        return
    results = measure([2, 1] if args.quick else [100, 10], args.quick)
    from common import write_section

    command = ("python benchmarks/data.py " + " ".join(sys.argv[1:])).strip()
    text = report(results, command)
    write_section(args.output, "data", text)
    print(text)


if __name__ == "__main__":
    main()
