"""examples/hypergradient.py: the gradient through k unrolled train steps equals a central finite difference."""

import importlib.util

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import ROOT
from minifn import ModelConfig, init_params, optim

spec = importlib.util.spec_from_file_location("hypergradient", ROOT / "examples" / "hypergradient.py")
hypergradient = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hypergradient)

CONFIG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2, head_dim=8, ff_dim=32, max_seq_len=16)
K = 4


def problem():
    windows = torch.randint(0, CONFIG.vocab_size, (K + 1, 3, CONFIG.max_seq_len + 1))
    train = [(w[:, :-1], w[:, 1:]) for w in windows[:-1]]
    return train, (windows[-1][:, :-1], windows[-1][:, 1:]), init_params(CONFIG, 0, dtype=torch.float64)


# The initial parameters are checked with SGD only: Adam divides tiny gradients by their own size, which
# bends the loss so sharply in the parameters that no finite-difference step is both small and exact enough.
@pytest.mark.parametrize("optimizer,lr,wrt_params", [(optim.adam(lr=1e-2), 1e-2, False),
                                                     (optim.sgd(lr=0.3, momentum=0.9), 0.3, True)],
                         ids=["adam", "sgd"])
def test_hypergradient_matches_central_difference(optimizer, lr, wrt_params):
    train, val, params = problem()
    lr = torch.tensor(lr, dtype=torch.float64)
    kwargs = dict(config=CONFIG, optimizer=optimizer)
    d_lr, d_params, loss = hypergradient.hypergradient(lr, params, train, val, wrt_params=wrt_params, **kwargs)
    fd = hypergradient.finite_difference(lr, params, train, val, **kwargs)
    assert abs(float(d_lr - fd)) < 1e-5 * abs(float(fd)) and abs(float(fd)) > 1e-3
    if wrt_params:  # the directional derivative along the gradient's own unit direction v is its norm
        norm = sum(g.square().sum() for g in d_params.values()).sqrt()
        v = {k: g / norm for k, g in d_params.items()}
        h = 1e-6
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            up, down = (hypergradient.unrolled_loss(lr, {k: p + s * v[k] for k, p in params.items()}, train, val,
                                                    **kwargs) for s in (h, -h))
        torch.testing.assert_close(norm, (up - down) / (2 * h), rtol=1e-5, atol=0)
