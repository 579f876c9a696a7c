"""Causal attention under a CPU bfloat16 autocast: autocast's own choice (SDPA in bfloat16) against
minifn.model.causal_attention (SDPA in float32 on the same bfloat16 q, k, v), forward and backward.

    python benchmarks/attention.py                      # tutorial, seed and bench shapes, writes RESULTS.md
    python benchmarks/attention.py --configs tiny --rounds 3 --output /tmp/r.md   # a quick check

Autocast lists SDPA among the ops it runs in bfloat16, and torch's CPU flash kernel is slow there at small
head dimensions. The question: which should the model's attention use under a CPU autocast? Each form runs
eagerly and compiled, all four in turn in one process (so machine noise hits them alike); times are medians
over --rounds of one forward and backward pass of one layer's attention at each config's shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, machine, write_section  # noqa: E402

from minifn.model import causal_attention  # noqa: E402


def autocast_choice(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


FORMS = {"autocast's choice (bfloat16 SDPA)": autocast_choice, "causal_attention (float32 SDPA)": causal_attention}


def measure(config_name: str, rounds: int) -> tuple[tuple[int, ...], list[dict]]:
    config, batch_size = CONFIGS[config_name]
    shape = (batch_size, config.num_heads, config.max_seq_len, config.head_dim)
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch_size, config.max_seq_len, 3, config.num_heads, config.head_dim,
                      generator=generator).bfloat16().requires_grad_()

    def pass_of(fn):
        def once():  # as the model's: q and k contiguous (rotary's outputs), v a strided view of qkv's output
            q, k, v = qkv.unbind(2)
            q, k, v = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(q, k, v)
            torch.autograd.grad(y, qkv, torch.ones_like(y))
        return once

    runs = []
    for mode in ("eager", "compiled"):
        for form, fn in FORMS.items():
            runs.append({"mode": mode, "form": form, "times": [],
                         "run": pass_of(torch.compile(fn, fullgraph=True) if mode == "compiled" else fn)})
    for run in runs:  # compile, and a warm-up pass
        run["run"]()
        run["run"]()
    for _ in range(rounds):
        for run in runs:
            start = time.perf_counter()
            run["run"]()
            run["times"].append(time.perf_counter() - start)
    return shape, [{"mode": r["mode"], "form": r["form"], "ms": 1e3 * statistics.median(r["times"])} for r in runs]


def report(sections: dict, rounds: int, command: str) -> str:
    old, new = FORMS
    lines = ["## Attention under a CPU bfloat16 autocast", "", f"Machine: {machine()}", "", f"Command: `{command}`",
             "", "One layer's causal attention, forward and backward, on bfloat16 q, k, v laid out as the model's; the "
             f"four in turn in one process, median ms of {rounds} rounds. Speed-up: {old}'s time over {new}'s, "
             "same mode.", "",
             f"| config | shape B, H, T, K | mode | {old} ms | {new} ms | speed-up |", "|---|---|---|---|---|---|"]
    for name, (shape, rows) in sections.items():
        for mode in ("eager", "compiled"):
            a, b = (next(r["ms"] for r in rows if r["mode"] == mode and r["form"] == f) for f in FORMS)
            lines.append(f"| {name} | {', '.join(map(str, shape))} | {mode} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tutorial,seed,bench")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    sections = {name: measure(name, args.rounds) for name in args.configs.split(",")}
    command = ("python benchmarks/attention.py " + " ".join(sys.argv[1:])).strip()
    text = report(sections, args.rounds, command)
    write_section(args.output, "attention", text)
    print(text)


if __name__ == "__main__":
    main()
