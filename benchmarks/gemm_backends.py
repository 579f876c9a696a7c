"""The model's float32 matrix products through MKL (what aten's mm, and so every train step, calls on x86
CPUs) in two layouts, and through oneDNN, the other library in torch's CPU build, shape by shape.

    python benchmarks/gemm_backends.py                  # seed and bench shapes, writes RESULTS.md
    python benchmarks/gemm_backends.py --configs tiny --rounds 2 --output /tmp/r.md   # a quick check

Each linear layer of a config costs three products per step: the forward y = x W^T, and the backward
dx = dy W and dW = dy^T x, in the layouts autograd gives aten (the MKL column). MKL can compute each
product's transpose instead and hand back a transposed view (the "MKL, C^T" column: (W x^T)^T,
(W^T dy^T)^T, (x^T dy)^T), which some shapes run faster; oneDNN is reached through
torch.ops.mkldnn._linear_pointwise, which takes plain tensors, and computes the same products in
float32 (it is not reduced precision). All three run round-robin in one process, and each time is the
median over --rounds. The question it answers: how much of a step is left on the table by the BLAS
library and layout alone, which a train step built on torch's ops cannot choose.
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


BACKENDS = ("mkl", "mkl_t", "onednn")


def products(m: int, k: int, n: int) -> dict[str, tuple]:
    """The three products of one linear layer: name -> (MKL, MKL computing the transpose, oneDNN) calls."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=g) for shape in ((m, k), (n, k), (m, n)))
    return {"forward x W^T": (lambda: x @ w.T, lambda: (w @ x.T).T, lambda: onednn(x, w)),
            "dx = dy W": (lambda: dy @ w, lambda: (w.T @ dy.T).T, lambda: onednn(dy, w.T)),
            "dW = dy^T x": (lambda: dy.T @ x, lambda: (x.T @ dy).T, lambda: onednn(x.T, dy.T).T)}


def measure(config_name: str, rounds: int) -> list[dict]:
    config, batch_size = CONFIGS[config_name]
    rows = []
    for layer, count, m, k, n in linear_shapes(config, batch_size):
        for name, calls in products(m, k, n).items():
            for other in calls[1:]:  # the same product, to rounding
                torch.testing.assert_close(other(), calls[0](), rtol=1e-4, atol=1e-3)
            times = {backend: [] for backend in BACKENDS}
            for _ in range(rounds):
                for backend, fn in zip(BACKENDS, calls):
                    start = time.perf_counter()
                    fn()
                    times[backend].append(time.perf_counter() - start)
            med = {b: statistics.median(t) for b, t in times.items()}
            rows.append({"layer": layer, "count": count, "shape": f"{m}x{k}x{n}", "product": name,
                         "flops": 2 * m * k * n, **med})
    return rows


# minifn.onednn's route with MINIFN_LINEAR=onednn (its only route before it was timed per shape): forward
# products and input gradients in oneDNN, weight gradients in aten (MKL)
ROUTE = {"forward x W^T": "onednn", "dx = dy W": "onednn", "dW = dy^T x": "mkl"}


def report(sections: dict[str, list[dict]], command: str) -> str:
    lines = [f"## Matrix products: MKL against oneDNN ({vector_level()})", "", f"Machine: {machine()}", "",
             f"Command: `{command}`", "",
             "Float32, one process, the three in turn; median ms per product. Shape is tokens x in x out. "
             "MKL C^T: MKL computing the product's transpose, returned as a transposed view. "
             "'Step total' weighs each product by how often a step runs it (once per layer); the all-oneDNN "
             "route (minifn's with MINIFN_LINEAR=onednn) is oneDNN for forward products and input gradients, "
             "MKL for weight gradients; minifn's default times both libraries per shape and takes the faster.", ""]
    for name, rows in sections.items():
        lines += [f"### {name}", "", "| layer | shape | product | MKL ms | MKL C^T ms | oneDNN ms | MKL GFLOP/s | "
                  "fastest GFLOP/s | fastest |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            fastest = min(BACKENDS, key=lambda b: r[b])
            lines.append(f"| {r['layer']} | {r['shape']} | {r['product']} | {r['mkl'] * 1e3:.2f} | "
                         f"{r['mkl_t'] * 1e3:.2f} | {r['onednn'] * 1e3:.2f} | {r['flops'] / r['mkl'] / 1e9:.0f} | "
                         f"{r['flops'] / r[fastest] / 1e9:.0f} | {fastest} |")
        for label, chosen in (("forward products only", [r for r in rows if r["product"].startswith("forward")]),
                              ("all products", rows)):
            mkl = sum(r["count"] * r["mkl"] for r in chosen)
            route = sum(r["count"] * r[ROUTE[r["product"]]] for r in chosen)
            best = sum(r["count"] * min(r[b] for b in BACKENDS) for r in chosen)
            lines.append(f"\nStep total, {label}: MKL {mkl * 1e3:.1f} ms; the all-oneDNN route {route * 1e3:.1f} ms "
                         f"({mkl / route:.2f}x); the fastest of the three for each product {best * 1e3:.1f} ms "
                         f"({mkl / best:.2f}x).")
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
