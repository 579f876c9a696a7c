"""Decoding speed: KV-cached compiled decode steps against recomputing the whole context per token.

    python benchmarks/generate.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CONFIGS, machine, write_section  # noqa: E402

from minifn import apply, init_params  # noqa: E402
from minifn.generate import generate, make_decode_step  # noqa: E402


def full_recompute(params, prompt, config, new_tokens):
    """The original's method: run the model over all tokens so far for every new token (greedy)."""
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = apply(params, tokens, config)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt):].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default="seed")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    base, _ = CONFIGS[args.config]
    config = dataclasses.replace(base, max_seq_len=args.prompt_tokens + args.new_tokens)
    params = init_params(config, 0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    decode = make_decode_step(config, compile="on")

    def cached():
        with torch.no_grad():
            return list(generate(params, prompt, config, max_new_tokens=args.new_tokens, decode=decode,
                                 temperature=0))

    start = time.perf_counter()
    cached()  # compiles the decode step once
    compile_s = time.perf_counter() - start
    runs = 1 if args.quick else 3
    cached_s, full_s = [], []
    for _ in range(runs):
        start = time.perf_counter()
        ids_cached = cached()
        cached_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ids_full = full_recompute(params, prompt, config, args.new_tokens)
        full_s.append(time.perf_counter() - start)
    same = ids_cached == ids_full
    c, f = sorted(cached_s)[len(cached_s) // 2], sorted(full_s)[len(full_s) // 2]
    text = f"""## Generation

Machine: {machine()}

Command: `python benchmarks/generate.py {' '.join(sys.argv[1:])}`

{args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, greedy, batch 1, {args.config} config
(context {config.max_seq_len}): KV-cached compiled decoding {args.new_tokens / c:.0f} tokens/s, full-context
recompute (eager, the original's method) {args.new_tokens / f:.0f} tokens/s: **{f / c:.1f}x**.
Both produced the same tokens: {same}. One-off compile of the decode step: {compile_s:.0f} s.
"""
    write_section(args.output, "generate", text)
    print(text)
    if not same:
        sys.exit("cached and full-recompute decoding disagree")


if __name__ == "__main__":
    main()
