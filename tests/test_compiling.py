"""maybe_compile's handling of the hyperparameters a state carries as 0-D float64 tensors."""

from typing import NamedTuple

import torch
from torch._dynamo.utils import counters

from minifn.compiling import maybe_compile


class Hyper(NamedTuple):
    lr: torch.Tensor
    count: torch.Tensor


def update(params: dict, hyper: Hyper, scale: torch.Tensor):
    new = {k: p - hyper.lr * scale * p for k, p in params.items()}
    return new, hyper._replace(count=hyper.count + 1)


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
