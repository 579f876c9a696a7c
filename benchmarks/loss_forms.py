"""The train step with cross-entropy written two ways: aten's F.cross_entropy, and logsumexp(z) - z[target].

    python benchmarks/loss_forms.py                      # seed and bench configs, writes RESULTS.md
    python benchmarks/loss_forms.py --configs tiny --rounds 2 --output /tmp/r.md   # a quick check

Both forms compute the same loss and gradients. Eager, F.cross_entropy is one fused aten kernel. Compiled,
inductor decomposes it into a log-softmax whose [B, T, V] output is saved for the backward pass, while the
logsumexp form saves only [B, T] and recomputes the softmax from the logits in the backward kernel. The
question: which form should minifn's cross_entropy use, eager and compiled? It uses the winner of each
(losses.cross_entropy). All four steps (two forms, eager and compiled; state donated, as minifn train runs)
start from the same parameters and step round-robin in one process; times are medians over --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, LR, WEIGHT_DECAY, batch_for, machine, sync, write_section  # noqa: E402

from minifn import optim  # noqa: E402
from minifn.allocator import keep_freed_memory  # noqa: E402
from minifn.losses import IGNORE_INDEX, logsumexp_cross_entropy  # noqa: E402
from minifn.model import init_params  # noqa: E402
from minifn.step import init_state, make_train_step  # noqa: E402


def functional_form(logits, targets, reduction="sum"):
    assert reduction == "sum", reduction  # what train_step asks for
    per_position = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none",
                                   ignore_index=IGNORE_INDEX)
    return per_position.sum()


def logsumexp_form(logits, targets, reduction="sum"):
    assert reduction == "sum", reduction
    return (logsumexp_cross_entropy(logits, targets) * (targets != IGNORE_INDEX)).sum()


FORMS = {"F.cross_entropy": functional_form, "logsumexp - target logit": logsumexp_form}


def measure(config_name: str, rounds: int, modes: list[str]) -> list[dict]:
    config, batch_size = CONFIGS[config_name]
    params = init_params(config, seed=0)
    batch = batch_for(config, batch_size)
    tx = optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    runs = []
    for mode in modes:
        compiled = mode == "compiled"
        for form, loss_fn in FORMS.items():
            step = make_train_step(config, tx, loss_fn=loss_fn, compile="on" if compiled else "off", inplace=True)
            runs.append({"mode": mode, "form": form, "step": step,
                         "state": init_state({k: v.clone() for k, v in params.items()}, tx), "times": []})
    for run in runs:  # compile, and two steps' warm-up
        for _ in range(2):
            run["state"], _ = run["step"](run["state"], batch)
    for _ in range(rounds):
        for run in runs:
            sync()
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], batch)
            metrics["loss"].item()
            run["times"].append(time.perf_counter() - start)
    return [{"mode": r["mode"], "form": r["form"], "ms": 1e3 * statistics.median(r["times"]),
             "min_ms": 1e3 * min(r["times"])} for r in runs]


def report(sections: dict[str, list[dict]], command: str) -> str:
    lines = ["## Cross-entropy: F.cross_entropy against logsumexp - target logit", "",
             f"Machine: {machine()}", "", f"Command: `{command}`", "",
             "Whole train steps (AdamW, state donated), the four in turn in one process; median ms per step.",
             "Speed-up: F.cross_entropy's time over the logsumexp form's, same mode, of the medians (and of the",
             "fastest steps).", "",
             "| config | mode | rounds | F.cross_entropy ms | logsumexp form ms | logsumexp speed-up "
             "| fastest steps ms | speed-up, fastest |", "|---|---|---|---|---|---|---|---|"]
    for name, (rounds, rows) in sections.items():
        for mode in dict.fromkeys(r["mode"] for r in rows):
            fn, lse = (next(r for r in rows if r["mode"] == mode and r["form"] == f) for f in FORMS)
            lines.append(f"| {name} | {mode} | {rounds} | {fn['ms']:.1f} | {lse['ms']:.1f} "
                         f"| {fn['ms'] / lse['ms']:.3f}x | {fn['min_ms']:.1f} / {lse['min_ms']:.1f} "
                         f"| {fn['min_ms'] / lse['min_ms']:.3f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench")
    parser.add_argument("--rounds", type=int, default=0, help="timed steps per variant [60 at seed, 16 else]")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated, from eager and compiled")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    keep_freed_memory()  # as the command line runs
    sections = {}
    for name in args.configs.split(","):
        rounds = args.rounds or (60 if name == "seed" else 16)
        sections[name] = rounds, measure(name, rounds, args.modes.split(","))
    command = ("python benchmarks/loss_forms.py " + " ".join(sys.argv[1:])).strip()
    text = report(sections, command)
    write_section(args.output, "loss_forms", text)
    print(text)


if __name__ == "__main__":
    main()
