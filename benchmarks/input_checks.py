"""What the steps' input checks (minifn.step.check_inputs) cost against the step they guard.

    python benchmarks/input_checks.py [--configs seed,bench] [--repeats 200]

Per config: the median time of check_inputs on the benchmark batch, and in the same process the median
compiled (d) and eager donated (c) steps of train_step.py, which both run the check once per call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["MINIFN_BENCH_DEVICE"] = "cpu"  # a CPU benchmark: the check's CPU branch

from common import CONFIGS, batch_for, build, machine, median_seconds, write_section  # noqa: E402

from minifn import init_params  # noqa: E402
from minifn.step import check_inputs  # noqa: E402


def measure(config_name: str, repeats: int, steps: int) -> dict:
    config, batch_size = CONFIGS[config_name]
    params, batch = init_params(config, 0), batch_for(config, batch_size)
    check = median_seconds(lambda: check_inputs(params, batch, config), repeats)
    out = {"check_us": check * 1e6}
    for variant in ("d", "c"):
        step = build(variant, config, batch_size)
        step()  # the compile, for d
        out[f"{variant}_ms"] = median_seconds(step, steps) * 1e3
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls of the check")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each variant")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        m = measure(name, args.repeats, args.steps)
        rows.append(f"| {name} | {m['check_us']:.0f} | {m['d_ms']:.1f} | {m['check_us'] / 10 / m['d_ms']:.3f}% | "
                    f"{m['c_ms']:.1f} | {m['check_us'] / 10 / m['c_ms']:.3f}% |")
    text = f"""## Input checks against the step

Machine: {machine()}

Command: `python benchmarks/input_checks.py {' '.join(sys.argv[1:])}`

`check_inputs` (the batch's shape, dtype and id range, and the tree's names and shapes) runs before every
call of the steps `make_train_step` returns. Its median time against the median step, one process; the
share is check / step.

| config | check µs | compiled step (d) ms | share | eager donated step (c) ms | share |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    write_section(args.output, "input_checks", text)
    print(text)


if __name__ == "__main__":
    main()
