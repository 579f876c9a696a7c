"""The gradient of the validation loss after k unrolled training steps with respect to the learning rate
(and the initial parameters), by torch.func through minifn's pure train_step.

    python examples/hypergradient.py                      # tiny model, random tokens, Adam, k = 5
    python examples/hypergradient.py --optimizer sgd --steps 10 --text data/lighthouse.txt

The learning rate lives in the optimizer state as a 0-D tensor, so k steps of training followed by a
validation loss are one function lr -> loss, and torch.func.grad differentiates it: through every update,
Adam's moments, and the gradients themselves (second derivatives: each step's own grad_and_value runs
inside the outer transform). What torchopt's differentiable optimizers exist for falls out of the design.

Cost: the outer backward keeps all k steps alive, so memory grows linearly with k (every step's activations,
its inner backward graph and its state: about 20 MB per step at the default size), and the call takes a
few times the k plain steps (3-5x at the default size, on 2 CPU cores; the script prints both). It runs
eagerly (a func transform cannot wrap a compiled step), in float64 so that the finite-difference check is
meaningful, and with SDPA's math kernel, since the fused CPU attention kernel has no double backward.
The script prints its wall times and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minifn import ModelConfig, init_params, init_state, optim, train_step
from minifn.losses import IGNORE_INDEX
from minifn.model import apply


def cross_entropy(logits, targets, reduction="mean"):
    """minifn's cross-entropy in the logits' own dtype (minifn.losses upcasts to float32, too coarse here)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def with_hyperparam(opt_state, name: str, value: torch.Tensor):
    """opt_state with every hyperparameter called name replaced by value itself (a tensor being differentiated;
    optim.set_hyperparams copies a number into a new tensor instead)."""
    if hasattr(opt_state, "_fields"):
        return opt_state._replace(**{name: value}) if name in opt_state._fields else opt_state
    return tuple(with_hyperparam(s, name, value) for s in opt_state) if isinstance(opt_state, tuple) else opt_state


def unrolled_loss(lr, params, train_batches, val_batch, *, config, optimizer):
    """Validation loss after one train_step per batch, from params with learning rate lr (0-D tensor)."""
    state = init_state(params, optimizer)
    state = state._replace(opt_state=with_hyperparam(state.opt_state, "lr", lr))
    for batch in train_batches:  # [B, T] each
        state, _ = train_step(state, batch, config=config, optimizer=optimizer, loss_fn=cross_entropy)
    inputs, targets = val_batch
    return cross_entropy(apply(state.params, inputs, config), targets)


def hypergradient(lr, params, train_batches, val_batch, *, config, optimizer, wrt_params=False):
    """(d loss / d lr, d loss / d params or None, loss) through the unrolled run."""
    argnums = (0, 1) if wrt_params else 0
    with sdpa_kernel(SDPBackend.MATH):
        grads, loss = torch.func.grad_and_value(unrolled_loss, argnums=argnums)(
            lr, params, train_batches, val_batch, config=config, optimizer=optimizer)
    return (*grads, loss) if wrt_params else (grads, None, loss)


def finite_difference(lr, params, train_batches, val_batch, *, config, optimizer, rel_step=1e-6):
    """The central difference (L(lr + h) - L(lr - h)) / 2h, with h = rel_step * lr."""
    h = rel_step * lr
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        up, down = (unrolled_loss(lr + s, params, train_batches, val_batch, config=config, optimizer=optimizer)
                    for s in (h, -h))
    return (up - down) / (2 * h)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="unrolled training steps k")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=None, help="[1e-2 for adam, 0.3 for sgd]")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text", default=None, help="train on this text (Mistral tokenizer), not random tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    if args.text:
        from minifn.tokenizer import encode_file, load_tokenizer

        tok = load_tokenizer("mistral")
        tokens, vocab = torch.from_numpy(encode_file(tok, args.text).ids.astype("int64")), tok.vocab_size
    else:
        vocab = 256
        tokens = torch.randint(0, vocab, (4096,))
    config = ModelConfig(vocab_size=vocab, embed_dim=32, num_layers=2, num_heads=4, head_dim=8, ff_dim=64,
                         max_seq_len=32)
    T, B = config.max_seq_len, args.batch_size
    starts = torch.randint(0, len(tokens) - T - 1, (args.steps + 1, B, 1))
    windows = tokens[starts + torch.arange(T + 1)]  # [k + 1, B, T + 1]; the last batch is the validation batch
    train_batches = [(w[:, :-1], w[:, 1:]) for w in windows[:-1]]
    val_batch = (windows[-1][:, :-1], windows[-1][:, 1:])

    lr = torch.tensor(args.lr or (1e-2 if args.optimizer == "adam" else 0.3), dtype=torch.float64)
    optimizer = optim.adam(lr=float(lr)) if args.optimizer == "adam" else optim.sgd(lr=float(lr), momentum=0.9)
    params = init_params(config, seed=args.seed, dtype=torch.float64)
    common = dict(config=config, optimizer=optimizer)

    rss_before = peak_rss_mb()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        unrolled_loss(lr, params, train_batches, val_batch, **common)  # warm-up: first calls build things
        start = time.perf_counter()
        unrolled_loss(lr, params, train_batches, val_batch, **common)
        plain_s = time.perf_counter() - start
    rss_plain = peak_rss_mb()
    hypergradient(lr, params, train_batches, val_batch, wrt_params=True, **common)  # warm-up
    start = time.perf_counter()
    d_lr, d_params, loss = hypergradient(lr, params, train_batches, val_batch, wrt_params=True, **common)
    hyper_s = time.perf_counter() - start
    rss_hyper = peak_rss_mb()
    fd = finite_difference(lr, params, train_batches, val_batch, **common)

    print(f"{args.optimizer}, lr {float(lr):g}, k = {args.steps} steps of {B} x {T} tokens, "
          f"{sum(p.numel() for p in params.values())} parameters (float64)")
    print(f"validation loss after k steps: {float(loss):.6f}")
    print(f"d loss / d lr: {float(d_lr):.8g} (torch.func)  {float(fd):.8g} (central difference)  "
          f"relative difference {abs(float(d_lr - fd)) / max(abs(float(fd)), 1e-30):.1e}")
    print(f"|d loss / d initial params|: {torch.cat([g.flatten() for g in d_params.values()]).norm():.6g}")
    print(f"wall time: k plain steps {plain_s:.2f} s, hypergradient {hyper_s:.2f} s ({hyper_s / plain_s:.1f}x)")
    print(f"peak RSS: {rss_hyper:.0f} MB (after the k plain steps {rss_plain:.0f} MB, at start {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
