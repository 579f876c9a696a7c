"""maybe_compile's handling of the hyperparameters a state carries as 0-D float64 tensors, and of dropout."""

from typing import NamedTuple

import torch
from torch._dynamo.utils import counters

from minifn import trees
from minifn.compiling import DROPOUT_OPTIONS, maybe_compile
from minifn.rng import dropout, fold_in


class Hyper(NamedTuple):
    lr: torch.Tensor
    count: torch.Tensor


def update(params: dict, hyper: Hyper, scale: torch.Tensor):
    new = {k: p - hyper.lr * scale * p for k, p in params.items()}
    return new, trees.replace(hyper, count=hyper.count + 1)


def test_float64_scalars_compile_in_one_pass_and_stay_data(tmp_path, monkeypatch):
    """Dynamo restarts its trace for each 0-D float64 CPU input it cannot tensorify (pytorch#140346);
    maybe_compile passes them as [1] views, so one trace suffices, and a new value reuses the graph."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a step saved by an earlier run is not traced
    torch._dynamo.reset()
    counters.clear()
    step = maybe_compile(update, "on", "cpu")
    params = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))}
    hyper = Hyper(torch.tensor(0.25, dtype=torch.float64), torch.tensor(0))
    scale = torch.tensor(2.0, dtype=torch.float64)  # a lifted positional argument too
    new, out = step(params, hyper, scale)
    assert counters["aot_autograd"]["total"] == 1  # 2 when dynamo restarted
    torch.testing.assert_close(new["w"], params["w"] * 0.5, rtol=0, atol=0)
    assert out.lr.shape == () and out.lr.dtype == torch.float64 and out.count.item() == 1

    new, _ = step(params, Hyper(torch.tensor(0.125, dtype=torch.float64), out.count), scale)
    torch.testing.assert_close(new["w"], params["w"] * 0.75, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1


def nested_dropout(x, key):
    """Two residual dropout sites keyed by folds of one key, as the model's blocks are."""
    for site in range(2):
        x = x + dropout(torch.tanh(x), 0.1, fold_in(key, site))
    return x.sum(-1)


def test_dropout_options_compute_each_key_and_mask_once(tmp_path, monkeypatch):
    """Inductor inlines the hashed keys and masks into every reader, so its IR grows as 8 to the power of
    the fold depth; DROPOUT_OPTIONS realizes them (here 21,000 loop-body nodes without, 700 with), and
    the values stay those of eager."""
    import torch._inductor.loop_body as loop_body

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # generate code, rather than load it
    sizes, init = [], loop_body.LoopBody.__init__

    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sizes.append(len(self.root_block.graph.nodes) + sum(len(b.graph.nodes) for b in self.subblocks.values()))

    monkeypatch.setattr(loop_body.LoopBody, "__init__", counting)
    x, key = torch.randn(4, 8), torch.tensor(int(torch.randint(0, 2**32, ())))
    nodes = {}
    for name, options in (("defaults", None), ("dropout", DROPOUT_OPTIONS)):
        sizes.clear()
        torch._dynamo.reset()
        out = maybe_compile(nested_dropout, "on", "cpu", options)(x, key)
        torch.testing.assert_close(out, nested_dropout(x, key), rtol=1e-5, atol=1e-5)
        nodes[name] = sum(sizes)
    assert 0 < nodes["dropout"] < nodes["defaults"] / 10, nodes
