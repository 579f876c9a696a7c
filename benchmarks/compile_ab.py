"""Cold compile of the train step at two commits, alternating in one run: what a change did to compile time.

    python benchmarks/compile_ab.py --base cbe6448 [--configs seed,bench] [--rounds 2]

Each round compiles minifn's compiled step (variant d) once at --base (checked out into a temporary git
worktree) and once at the working tree, each in a fresh process with an empty inductor cache and no
precompiled header (common.cache_env: a new machine), so the two see the same machine noise. Reports the
first step (compile included) and dynamo's share of it (tracing), as each commit's own
benchmarks/profile_step.py measures them (compile_split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(config_name: str) -> dict:
    """Runs inside a checkout (cwd): its minifn, and its profile_step's compile timing."""
    sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks")]
    from profile_step import compile_split

    import minifn
    assert minifn.__file__.startswith(os.getcwd()), minifn.__file__
    split = compile_split(config_name)
    return {"first_s": split["first_step_s"], "tracing_s": split["dynamo_s"]}


def cold(checkout: Path, config_name: str) -> dict:
    from common import run_script

    with tempfile.TemporaryDirectory() as cache:
        return run_script(HERE / "compile_ab.py", ["--worker", config_name], cache, cwd=checkout,
                          env={"PYTHONPATH": str(checkout)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the commit to compare against (required unless --worker)")
    parser.add_argument("--configs", default="seed,bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if not args.base:
        parser.error("--base COMMIT is required")
    from common import machine, write_section

    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    lines = ["## Cold compile, before and after a change (compiled step, variant d)", "", f"Machine: {machine()}", "",
             f"Command: `python benchmarks/compile_ab.py {' '.join(sys.argv[1:])}` (base {base_sha}, "
             f"new: the working tree at {head_sha}); rounds alternate base and new, each in a fresh process and "
             "an empty inductor cache (and no precompiled header: a new machine).", "",
             "| config | base first step s | new first step s | new / base | base tracing s | new tracing s |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            for name in args.configs.split(","):
                runs = {"base": [], "new": []}
                for _ in range(args.rounds):
                    runs["base"].append(cold(base, name))
                    runs["new"].append(cold(ROOT, name))
                    print(name, runs["base"][-1], runs["new"][-1], flush=True)
                mean = {k: {m: statistics.mean(r[m] for r in v) for m in ("first_s", "tracing_s")}
                        for k, v in runs.items()}
                each = {k: "/".join(f"{r['first_s']:.1f}" for r in v) for k, v in runs.items()}
                lines.append(f"| {name} | {mean['base']['first_s']:.1f} ({each['base']}) | "
                             f"{mean['new']['first_s']:.1f} ({each['new']}) | "
                             f"{mean['new']['first_s'] / mean['base']['first_s']:.2f} | "
                             f"{mean['base']['tracing_s']:.1f} | {mean['new']['tracing_s']:.1f} |")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    write_section(args.output, f"compile_ab-{args.base}", "\n".join(lines))  # one section per base compared
    print("\n".join(lines))


if __name__ == "__main__":
    main()
