"""Ways to wait less for torch.compile, measured against the one-graph step minifn uses.

    python benchmarks/compile_alternatives.py              # seed config, writes RESULTS.md
    python benchmarks/compile_alternatives.py --rounds 40

One graph, inductor's own AdamW: the step as minifn compiled it before it called torch's fused kernel as
a custom op (the AdamW blocks, which inductor turns into one large C++ kernel of its own).

Split: compile only the gradients and take the optimizer step eagerly with the fused AdamW kernel
(optim.step_inplace). Cold and warm first calls come from fresh processes on an empty, then filled,
inductor cache (one per variant); the step times from one process stepping all variants round-robin.

Background: start the eager step at once and compile on a copy of the state in another thread, to switch
when it is ready. Measured: how long the compile takes while eager steps run, and how fast those steps
are meanwhile. The eager steps use a model config that differs in the last bits of rope_theta, so they get
their own skeleton module: functional_call swaps tensors into the shared one, which breaks the guards
of a trace running in the other thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import optree
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, LR, WEIGHT_DECAY, batch_for, machine, run_script, write_section  # noqa: E402

from minifn import init_params, optim  # noqa: E402
from minifn.losses import IGNORE_INDEX  # noqa: E402
from minifn.step import init_state, loss_and_grads, make_train_step  # noqa: E402

# as minifn train composes it: global-norm clipping, then AdamW
CLIP, ADAMW = optim.clip_by_global_norm(1.0), optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
OPTIMIZER = optim.chain(CLIP, ADAMW)


def split_step(config):
    """(state, batch) -> state: compiled gradients, eager fused AdamW."""

    def gradients(params, batch):
        count = (batch[1] != IGNORE_INDEX).sum().clamp(min=1)  # as train_step: the loss is divided, not the grads
        grads, loss_sum, _, _ = loss_and_grads(params, batch, config=config, divisor=count)
        return grads, loss_sum / count, optim.global_norm(grads)

    compiled = torch.compile(gradients, fullgraph=True, dynamic=False)

    def step(state, batch):
        grads, _, _ = compiled(state.params, batch)
        opt_state = optim.step_inplace(OPTIMIZER, grads, state.opt_state, state.params)
        return state._replace(opt_state=opt_state, step=state.step + 1)

    return step


def one_graph_step(config, optimizer=OPTIMIZER):
    step = make_train_step(config, optimizer, compile="on", inplace=True)
    return lambda state, batch: step(state, batch)[0]


def inductors_adamw_step(config):
    """The one graph with AdamW's blocks instead of torch's fused kernel: inductor generates the update."""
    return one_graph_step(config, optim.chain(CLIP, ADAMW._replace(fused_step=None)))


STEPS = {"one graph": one_graph_step, "one graph, inductor's own AdamW": inductors_adamw_step, "split": split_step}


def stepper(make, config, batch):
    holder = [init_state(init_params(config, seed=0), OPTIMIZER)]
    step = make(config)

    def run():
        holder[0] = step(holder[0], batch)

    return run


def first_call(variant: str, name: str) -> dict:
    config, batch_size = CONFIGS[name]
    run = stepper(STEPS[variant], config, batch_for(config, batch_size))
    start = time.perf_counter()
    run()
    return {"first_s": time.perf_counter() - start}


def interleaved(name: str, rounds: int) -> dict:
    config, batch_size = CONFIGS[name]
    batch = batch_for(config, batch_size)
    runs = {label: stepper(make, config, batch) for label, make in STEPS.items()}
    for run in runs.values():
        run(), run(), run()
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def background(name: str, rounds: int) -> dict:
    config, batch_size = CONFIGS[name]
    batch = batch_for(config, batch_size)
    eager_config = dataclasses.replace(config, rope_theta=config.rope_theta * (1 + 1e-12))
    eager = make_train_step(eager_config, OPTIMIZER, compile="off", inplace=True)
    compiled = make_train_step(config, OPTIMIZER, compile="on", inplace=True)
    state = init_state(init_params(config, seed=0), OPTIMIZER)
    for _ in range(3):
        state, _ = eager(state, batch)
    alone = []
    for _ in range(rounds):
        start = time.perf_counter()
        state, _ = eager(state, batch)
        alone.append(time.perf_counter() - start)
    done = {}

    def compile_on_a_copy(copy):
        start = time.perf_counter()
        compiled(copy, batch)
        done["s"] = time.perf_counter() - start

    thread = threading.Thread(target=compile_on_a_copy, args=(optree.tree_map(torch.clone, state),))
    thread.start()
    during = []
    while "s" not in done:
        start = time.perf_counter()
        state, _ = eager(state, batch)
        during.append(time.perf_counter() - start)
    thread.join()
    return {"alone_s": statistics.median(alone), "during_s": statistics.median(during), "steps_during": len(during),
            "compile_s": done["s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="seed", choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "first":
            result = first_call(rest[0], args.config)
        elif kind == "interleaved":
            result = interleaved(args.config, args.rounds)
        else:
            result = background(args.config, args.rounds)
        print(json.dumps(result))
        return
    options = ["--config", args.config, "--rounds", str(args.rounds)]
    first = {}
    for variant in STEPS:
        with tempfile.TemporaryDirectory() as cache:
            cold = run_script(__file__, [*options, "--child", "first", variant], cache)  # the cache starts empty
            warm = run_script(__file__, [*options, "--child", "first", variant], cache)
            first[variant] = (cold["first_s"], warm["first_s"])
    with tempfile.TemporaryDirectory() as cache:
        steps = run_script(__file__, [*options, "--child", "interleaved"], cache)
    with tempfile.TemporaryDirectory() as cache:
        bg = run_script(__file__, [*options, "--child", "background"], cache)
    alone_in_compile = bg["compile_s"] / bg["alone_s"]
    command = f"python benchmarks/compile_alternatives.py {' '.join(sys.argv[1:])}".strip()
    lines = ["## Compile-time alternatives", "", f"Machine: {machine()}", "", f"Command: `{command}`",
             "", f"Config {args.config}, minifn train's optimizer (global-norm clipping, then AdamW). Step times "
             f"interleaved in one process ({args.rounds} rounds, medians); each variant compiled in a cache of "
             "its own.",
             "", "| step | cold first call s | warm first call s | step ms |", "|---|---|---|---|"]
    for variant in STEPS:
        cold, warm = first[variant]
        lines.append(f"| {variant} | {cold:.1f} | {warm:.1f} | {steps[variant] * 1e3:.1f} |")
    own = "one graph, inductor's own AdamW"
    saved_cold, saved_warm = (first[own][i] - first["one graph"][i] for i in (0, 1))
    lines += ["", f"Calling torch's fused kernel instead of inductor's own update saves {saved_cold:.1f} s of a cold "
              f"compile and {saved_warm:.1f} s of a warm one, and changes the step time by "
              f"{steps['one graph'] / steps[own] - 1:+.1%}. Split (compiled gradients, eager optimizer) changes it by "
              f"{steps['split'] / steps['one graph'] - 1:+.1%} and the cold compile by "
              f"{first['split'][0] - first['one graph'][0]:+.1f} s.",
              "", f"Background compile (empty cache): the compile took {bg['compile_s']:.1f} s while eager steps ran, "
              f"and those {bg['steps_during']} steps took {bg['during_s'] * 1e3:.0f} ms each against "
              f"{bg['alone_s'] * 1e3:.0f} ms alone. In the same time eager steps alone would have made "
              f"{alone_in_compile:.0f} steps."]
    text = "\n".join(lines)
    write_section(args.output, "compile_alternatives", text)
    print(text)


if __name__ == "__main__":
    main()
