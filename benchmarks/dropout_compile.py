"""What dropout costs the compiled step, with inductor's defaults and with minifn's DROPOUT_OPTIONS.

    python benchmarks/dropout_compile.py                  # tiny and seed configs, writes RESULTS.md
    python benchmarks/dropout_compile.py --configs tiny --steps 20

Each variant runs in a process of its own on an empty inductor cache: the first call (the cold compile),
then the median of --steps more steps. Loop-body nodes count the IR inductor generates code from (its
LoopBody graphs), the size that grows when keys and masks are inlined into every reader.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, LR, WEIGHT_DECAY, batch_for, machine, run_script, write_section  # noqa: E402

from minifn import init_params, optim  # noqa: E402
from minifn.compiling import DROPOUT_OPTIONS, maybe_compile  # noqa: E402
from minifn.model import skeleton  # noqa: E402
from minifn.step import init_state, train_step  # noqa: E402

OPTIMIZER = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY))
RATE = 0.1
VARIANTS = {  # name: (dropout rate, inductor options)
    "no dropout": (0.0, None),
    f"dropout {RATE}, inductor's defaults": (RATE, None),
    f"dropout {RATE}, DROPOUT_OPTIONS (what minifn uses)": (RATE, DROPOUT_OPTIONS),
}


def count_loop_body_nodes() -> list[int]:
    """A list that grows by each LoopBody's node count as inductor builds them."""
    import torch._inductor.loop_body as loop_body

    sizes, init = [], loop_body.LoopBody.__init__

    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sizes.append(len(self.root_block.graph.nodes) + sum(len(b.graph.nodes) for b in self.subblocks.values()))

    loop_body.LoopBody.__init__ = counting
    return sizes


def measure(variant: str, name: str, steps: int) -> dict:
    rate, options = VARIANTS[variant]
    config, batch_size = CONFIGS[name]
    skeleton(config)
    sizes = count_loop_body_nodes()
    step = maybe_compile(functools.partial(train_step, config=config, optimizer=OPTIMIZER, dropout_rate=rate,
                                           inplace=True), "on", "cpu", options)
    state, batch = init_state(init_params(config, seed=0), OPTIMIZER, seed=0), batch_for(config, batch_size)
    start = time.perf_counter()
    state, _ = step(state, batch)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, _ = step(state, batch)
        times.append(time.perf_counter() - start)
    return {"first_s": first, "step_s": statistics.median(times), "nodes": sum(sizes)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "seed"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps)))
        return
    results = {}
    for name in args.configs:
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as cache:
                results[name, variant] = run_script(__file__, ["--steps", str(args.steps), "--child", variant, name],
                                                    cache)
            print(name, variant, results[name, variant], flush=True)
    command = f"python benchmarks/dropout_compile.py {' '.join(sys.argv[1:])}".strip()
    lines = ["## Dropout in the compiled step", "", f"Machine: {machine()}", "", f"Command: `{command}`", "",
             f"minifn train's step (clipping, AdamW, state donated), float32. Each row is a process of its own on an "
             f"empty inductor cache: the first call, then the median of {args.steps} steps.", "",
             "| config | variant | cold first call s | ratio to no dropout | step ms | loop-body nodes |",
             "|---|---|---|---|---|---|"]
    for name in args.configs:
        base = results[name, "no dropout"]["first_s"]
        for variant in VARIANTS:
            r = results[name, variant]
            lines.append(f"| {name} | {variant} | {r['first_s']:.1f} | {r['first_s'] / base:.2f} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['nodes']:,} |")
    write_section(args.output, "dropout_compile", "\n".join(lines))


if __name__ == "__main__":
    main()
