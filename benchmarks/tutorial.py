"""The tutorial's command end to end, as a user runs it: `minifn train` with the README's flags (100 epochs
on mini-owl), each run on a cold machine (an empty inductor cache and no precompiled header of its own);
wall time and final loss.

    python benchmarks/tutorial.py                # --dtype auto and float32, each with --compile auto and off
    python benchmarks/tutorial.py --epochs 1 --compile off     # a quick check that it runs
    python benchmarks/tutorial.py --base c8ed8c2 --rounds 2    # the command as written, then and now

The flags are read from the README's command line, so the two cannot drift apart. The first row is the
command as written (the defaults --dtype auto --compile auto); the ratios are wall times over float32's
with --compile auto (the defaults before --dtype auto). With --base, each round runs the command as written
(the defaults of each commit) at COMMIT, checked out into a temporary git worktree, and then at the working
tree, so the two see the same machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cache_env, machine, vector_level, write_section  # noqa: E402

MINI_OWL = HERE.parent.parent / "shared" / "data" / "mini-owl.md"
DTYPES = ("auto", "float32")


def readme_flags() -> list[str]:
    """The README's tutorial command after `minifn train`, without --dataset (given here)."""
    text = (HERE.parent / "README.md").read_text()
    command = re.search(r"^minifn train --dataset \S*mini-owl\.md((?:.*\\\n)*.*)$", text, re.M)
    assert command, "the README no longer has the tutorial's command (minifn train --dataset ...mini-owl.md)"
    return shlex.split(command.group(1).replace("\\\n", " "))


def run(flags: list[str], checkout: Path = HERE.parent) -> dict:
    """One `minifn train` with flags, from checkout's minifn, on a cold machine: wall time and losses."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, **cache_env(folder), "PYTHONPATH": str(checkout), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "minifn", "train", "--dataset", str(MINI_OWL), *flags,
                   "--model", str(Path(folder) / "mini.pt")]
        start = time.perf_counter()
        out = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True, check=True).stdout
        seconds = time.perf_counter() - start
    precision = re.search(r"device \w+, ([^,]+), compile", out)  # commits before --dtype auto do not say
    losses = [float(x) for x in re.findall(r"\[Avg Loss: ([0-9.]+)\]", out)]
    below = next((epoch for epoch, loss in enumerate(losses, 1) if loss < 0.1), None)
    return {"seconds": seconds, "loss": losses[-1], "first_below_0.1": below,
            "precision": precision.group(1) if precision else "float32 (its only default)"}


def against_base(flags: list[str], base: str, rounds: int) -> str:
    """The command as written at base and at the working tree, alternating; the section's text."""
    sha = subprocess.run(["git", "rev-parse", "--short", base], cwd=HERE.parent, capture_output=True, text=True,
                         check=True).stdout.strip()
    runs = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(checkout), base], cwd=HERE.parent, check=True)
        try:
            for _ in range(rounds):
                for name, where in (("base", checkout), ("new", HERE.parent)):
                    runs[name].append(run(flags, where))
                    print(name, runs[name][-1], file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=HERE.parent, check=True)
    mean = {k: statistics.mean(r["seconds"] for r in v) for k, v in runs.items()}
    lines = [f"`minifn train --dataset mini-owl.md {shlex.join(flags)}` as written (each commit's defaults), at "
             f"{sha} and at the working tree, {rounds} rounds alternating, each run on a cold machine.", "",
             "| commit | precision | wall s, each round | mean wall s | ratio to base | final avg loss "
             "| first epoch < 0.1 |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("base", sha), ("new", "working tree")):
        r = runs[name]
        walls, losses = " / ".join(f"{x['seconds']:.1f}" for x in r), " / ".join(f"{x['loss']:.4f}" for x in r)
        lines.append(f"| {label} | {r[-1]['precision']} | {walls} | {mean[name]:.1f} | "
                     f"{mean[name] / mean['base']:.2f} | {losses} | {r[-1]['first_below_0.1'] or 'never'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override --num-epochs [the README's]")
    parser.add_argument("--compile", default="auto,off", help="comma-separated --compile modes [auto,off]")
    parser.add_argument("--base", help="compare the command as written at this commit with the working tree")
    parser.add_argument("--rounds", type=int, default=2, help="with --base: rounds of base then new [2]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    if not MINI_OWL.exists():
        sys.exit(f"{MINI_OWL} is absent; this benchmark needs the shared data folder beside the repository")
    flags = readme_flags() + (["--num-epochs", str(args.epochs)] if args.epochs else [])
    command = "python benchmarks/tutorial.py " + " ".join(sys.argv[1:])
    head = ["## The tutorial's command, end to end", "", f"Machine: {machine()}", "",
            f"Command: `{command.strip()}`", ""]
    if args.base:
        text = "\n".join(head) + "\n" + against_base(flags, args.base, args.rounds)
        write_section(args.output, f"tutorial-{args.base}-{vector_level()}", text)
        print(text)
        return
    modes = args.compile.split(",")
    results = {}
    for dtype in DTYPES:
        for compile_mode in modes:
            results[dtype, compile_mode] = run([*flags, "--dtype", dtype, "--compile", compile_mode])
            print(dtype, compile_mode, results[dtype, compile_mode], file=sys.stderr, flush=True)
    base = results["float32", modes[0]]["seconds"]
    lines = [*head, f"`minifn train --dataset mini-owl.md {shlex.join(flags)}` with each `--dtype` and `--compile`, "
             "one run each, each on a cold machine (a first run's wall time, compile included).", "",
             f"| --dtype | precision it chose | --compile | wall s | ratio to float32, compile {modes[0]} "
             "| final avg loss | first epoch < 0.1 |",
             "|---|---|---|---|---|---|---|"]
    for (dtype, compile_mode), r in results.items():
        lines.append(f"| {dtype} | {r['precision']} | {compile_mode} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} "
                     f"| {r['loss']:.4f} | {r['first_below_0.1'] or 'never'} |")
    text = "\n".join(lines)
    write_section(args.output, "tutorial", text)
    print(text)


if __name__ == "__main__":
    main()
