"""Optimizer-only benchmark: one eager AdamW step (update + apply) on a model-sized parameter tree.

    python benchmarks/optim_eager.py                     # seed and bench parameter trees, writes RESULTS.md
    python benchmarks/optim_eager.py --configs seed --rounds 5 --threads 1

torch.optim.AdamW updates in place; minifn returns new trees (inputs untouched), so it must allocate
the new parameters and moments, unless the caller donates its state: then its blocks update their own
buffers (update(..., inplace=True)), or, as minifn train runs, optim.step_inplace runs torch's fused
AdamW kernel. Times are medians of variants stepped round-robin in one process;
'new tensors' is the peak memory of tensors created during one step that did not exist before it,
in units of the parameter tree (CPU: counted at dispatch; CUDA: the allocator's peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import optree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, LR, WEIGHT_DECAY, bench_device, machine, sync, write_section  # noqa: E402

from minifn import init_params, optim  # noqa: E402


class NewTensors(TorchDispatchMode):
    """Bytes of live tensors created under this mode (peak and current), storages in `old` excluded."""

    def __init__(self, old):
        super().__init__()
        self.old, self.live, self.now, self.peak = {t.untyped_storage().data_ptr() for t in old}, set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out):
            ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
            if ptr and ptr not in self.old and ptr not in self.live:
                size = t.untyped_storage().nbytes()
                self.live.add(ptr)
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(t.untyped_storage(), self._free, ptr, size)
        return out

    def _free(self, ptr, size):
        self.live.discard(ptr)
        self.now -= size


def build(variant: str, params: dict, grads: dict):
    """(step, tensors that exist between steps) for one variant."""
    if variant.startswith("torch"):
        ps = [p.clone() for p in params.values()]
        for p, g in zip(ps, grads.values()):
            p.grad = g
        fused = variant == "torch_fused"
        opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=None if fused else True, fused=fused)
        return opt.step, lambda: ps + list(grads.values()) + optree.tree_leaves(opt.state_dict()["state"])
    tx = optim.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    donated = variant == "minifn_donated"
    holder = [{k: v.clone() for k, v in params.items()}, tx.init(params)]

    def step():
        p, s = holder
        if variant == "minifn_step_inplace":
            holder[1] = optim.step_inplace(tx, grads, s, p)
            return
        updates, s = tx.update(grads, s, p, inplace=donated)
        holder[:] = [optim.apply_updates(p, updates, inplace=donated), s]

    return step, lambda: optree.tree_leaves(holder) + list(grads.values())


def measure(config_name: str, rounds: int) -> dict:
    device = bench_device()
    params = init_params(CONFIGS[config_name][0], seed=0, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    grads = {k: torch.randn(v.shape, generator=g, device=device) * 1e-3 for k, v in params.items()}
    variants = {"torch.optim.AdamW (default: foreach)": "torch_foreach",
                "torch.optim.AdamW(fused=True)": "torch_fused",
                "minifn adamw: update + apply_updates": "minifn",
                "minifn adamw, state donated: update + apply_updates, inplace=True": "minifn_donated",
                "minifn adamw, state donated: optim.step_inplace (fused kernel, as minifn train)":
                    "minifn_step_inplace"}
    steps = {label: build(v, params, grads) for label, v in variants.items()}
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    result = {"params_m": sum(p.numel() for p in params.values()) / 1e6, "variants": {v: {} for v in variants}}
    for step, _ in steps.values():
        step(), step()
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, (step, _) in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[label].append(time.perf_counter() - start)
    for label, (step, existing) in steps.items():  # after the timings: tracking tensors slows later steps
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with NewTensors(existing()) as tracker:
                step()
            peak = tracker.peak
        result["variants"][label] = {"new": peak / model_bytes, "times": times[label]}
    return result


def report(results: dict, command: str) -> str:
    lines = ["## Optimizer step, eager", "", f"Machine: {machine()}", "", f"Command: `{command}`", "",
             "One AdamW step (lr 1e-3, weight decay 0.01) on each config's parameter tree with fixed gradients;",
             "variants stepped round-robin in one process, medians; ratio is speed relative to the first row.", ""]
    for name, r in results.items():
        lines += [f"### {name}: {r['params_m']:.1f}M parameters", "",
                  "| variant | step ms | ratio | new tensors (x params) |", "|---|---|---|---|"]
        base = statistics.median(next(iter(r["variants"].values()))["times"])
        for label, v in r["variants"].items():
            ms = statistics.median(v["times"])
            lines.append(f"| {label} | {ms * 1e3:.1f} | {base / ms:.2f} | {v['new']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [torch's default]")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {name: measure(name, args.rounds) for name in args.configs.split(",")}
    text = report(results, ("python benchmarks/optim_eager.py " + " ".join(sys.argv[1:])).strip())
    write_section(args.output, "optim_eager", text)
    print(text)


if __name__ == "__main__":
    main()
