"""The tutorial's command end to end, as a user runs it: `minifn train` with the README's flags (100 epochs
on mini-owl), each run with an empty inductor cache of its own; wall time and final loss.

    python benchmarks/tutorial.py                # --dtype auto and float32, each with --compile auto and off
    python benchmarks/tutorial.py --epochs 1 --compile off     # a quick check that it runs

The flags are read from the README's command line, so the two cannot drift apart. The first row is the
command as written (the defaults --dtype auto --compile auto); the ratios are wall times over float32's
with --compile auto (the defaults before --dtype auto).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write_section  # noqa: E402

MINI_OWL = HERE.parent.parent / "shared" / "data" / "mini-owl.md"
DTYPES = ("auto", "float32")


def readme_flags() -> list[str]:
    """The README's tutorial command after `minifn train`, without --dataset (given here)."""
    text = (HERE.parent / "README.md").read_text()
    command = re.search(r"^minifn train --dataset \S*mini-owl\.md((?:.*\\\n)*.*)$", text, re.M)
    assert command, "the README no longer has the tutorial's command (minifn train --dataset ...mini-owl.md)"
    return shlex.split(command.group(1).replace("\\\n", " "))


def run(flags: list[str], dtype: str, compile_mode: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(folder) / "inductor"), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "minifn", "train", "--dataset", str(MINI_OWL), *flags, "--dtype", dtype,
                   "--compile", compile_mode, "--model", str(Path(folder) / "mini.pt")]
        start = time.perf_counter()
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        seconds = time.perf_counter() - start
    precision = re.search(r"device \w+, ([^,]+), compile", out).group(1)
    losses = [float(x) for x in re.findall(r"\[Avg Loss: ([0-9.]+)\]", out)]
    below = next((epoch for epoch, loss in enumerate(losses, 1) if loss < 0.1), None)
    return {"seconds": seconds, "loss": losses[-1], "first_below_0.1": below, "precision": precision}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override --num-epochs [the README's]")
    parser.add_argument("--compile", default="auto,off", help="comma-separated --compile modes [auto,off]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    if not MINI_OWL.exists():
        sys.exit(f"{MINI_OWL} is absent; this benchmark needs the shared data folder beside the repository")
    flags = readme_flags() + (["--num-epochs", str(args.epochs)] if args.epochs else [])
    modes = args.compile.split(",")
    results = {}
    for dtype in DTYPES:
        for compile_mode in modes:
            results[dtype, compile_mode] = run(flags, dtype, compile_mode)
            print(dtype, compile_mode, results[dtype, compile_mode], file=sys.stderr, flush=True)
    base = results["float32", modes[0]]["seconds"]
    command = "python benchmarks/tutorial.py " + " ".join(sys.argv[1:])
    lines = ["## The tutorial's command, end to end", "", f"Machine: {machine()}", "", f"Command: `{command.strip()}`",
             "", f"`minifn train --dataset mini-owl.md {shlex.join(flags)}` with each `--dtype` and `--compile`, "
             "one run each, each with an empty inductor cache (a first run's wall time, compile included).", "",
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
