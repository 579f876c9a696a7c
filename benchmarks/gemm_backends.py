"""The model's float32 matrix products through MKL (what aten's mm, and so every train step, calls on x86
CPUs) against oneDNN, the other library in torch's CPU build, shape by shape.

    python benchmarks/gemm_backends.py                  # seed and bench shapes, writes RESULTS.md
    python benchmarks/gemm_backends.py --configs tiny --rounds 2 --output /tmp/r.md   # a quick check

Each linear layer of a config costs three products per step: the forward y = x W^T, and the backward
dx = dy W and dW = (x^T dy)^T, in the layouts autograd gives aten. oneDNN is reached through
torch.ops.mkldnn._linear_pointwise, which takes plain tensors; it computes the same products in float32
(it is not reduced precision). Both run round-robin in one process, and each time is the median over
--rounds. The question it answers: how much of a step is left on the table by the BLAS library alone,
which a train step built on torch's ops cannot choose.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, machine, vector_level, write_section  # noqa: E402


def onednn(x, w):
    """x @ w.T through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def linear_shapes(config, batch_size: int) -> list[tuple[str, int, int, int, int]]:
    """(layer, count per step, tokens M, in K, out N) for every linear layer of the config."""
    c, tokens = config, batch_size * config.max_seq_len
    hk = c.num_heads * c.head_dim
    n = c.num_layers
    return [("qkv", n, tokens, c.embed_dim, 3 * hk), ("out", n, tokens, hk, c.embed_dim),
            ("up", n, tokens, c.embed_dim, 2 * c.ff_dim), ("down", n, tokens, c.ff_dim, c.embed_dim),
            ("head", 1, tokens, c.embed_dim, c.vocab_size)]


def products(m: int, k: int, n: int) -> dict[str, tuple]:
    """The three products of one linear layer: name -> (MKL call, oneDNN call)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=g) for shape in ((m, k), (n, k), (m, n)))
    return {"forward x W^T": (lambda: x @ w.T, lambda: onednn(x, w)),
            "dx = dy W": (lambda: dy @ w, lambda: onednn(dy, w.T)),
            "dW = (x^T dy)^T": (lambda: x.T @ dy, lambda: onednn(x.T, dy.T))}


def measure(config_name: str, rounds: int) -> list[dict]:
    config, batch_size = CONFIGS[config_name]
    rows = []
    for layer, count, m, k, n in linear_shapes(config, batch_size):
        for name, (mkl, dnn) in products(m, k, n).items():
            torch.testing.assert_close(dnn(), mkl(), rtol=1e-4, atol=1e-3)  # the same product, to rounding
            times = {"mkl": [], "onednn": []}
            for _ in range(rounds):
                for backend, fn in (("mkl", mkl), ("onednn", dnn)):
                    start = time.perf_counter()
                    fn()
                    times[backend].append(time.perf_counter() - start)
            med = {b: statistics.median(t) for b, t in times.items()}
            rows.append({"layer": layer, "count": count, "shape": f"{m}x{k}x{n}", "product": name,
                         "flops": 2 * m * k * n, **med})
    return rows


def report(sections: dict[str, list[dict]], command: str) -> str:
    lines = [f"## Matrix products: MKL against oneDNN ({vector_level()})", "", f"Machine: {machine()}", "",
             f"Command: `{command}`", "",
             "Float32, one process, the two libraries in turn; median ms per product. Shape is tokens x in x out.",
             "'Step total' weighs each product by how often a step runs it (once per layer).", ""]
    for name, rows in sections.items():
        lines += [f"### {name}", "", "| layer | shape | product | MKL ms | oneDNN ms | MKL GFLOP/s | oneDNN GFLOP/s |"
                  " oneDNN speed-up |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['layer']} | {r['shape']} | {r['product']} | {r['mkl'] * 1e3:.2f} | "
                         f"{r['onednn'] * 1e3:.2f} | {r['flops'] / r['mkl'] / 1e9:.0f} | "
                         f"{r['flops'] / r['onednn'] / 1e9:.0f} | {r['mkl'] / r['onednn']:.2f}x |")
        for label, chosen in (("forward products only", [r for r in rows if r["product"].startswith("forward")]),
                              ("all products", rows)):
            mkl = sum(r["count"] * r["mkl"] for r in chosen)
            best = sum(r["count"] * min(r["mkl"], r["onednn"]) for r in chosen)
            lines.append(f"\nStep total, {label}: MKL {mkl * 1e3:.1f} ms; the faster library for each product "
                         f"{best * 1e3:.1f} ms ({mkl / best:.2f}x).")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="seed,bench")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per product and library")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    if not torch.backends.mkldnn.is_available():
        sys.exit("this torch was built without oneDNN")
    sections = {name: measure(name, args.rounds) for name in args.configs.split(",")}
    command = ("python benchmarks/gemm_backends.py " + " ".join(sys.argv[1:])).strip()
    text = report(sections, command)
    # one section per vector level: the two libraries rank differently on AVX2 and AVX-512 machines
    write_section(args.output, f"gemm_backends-{vector_level()}", text)
    print(text)


if __name__ == "__main__":
    main()
