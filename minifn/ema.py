"""An exponential moving average of the parameters, as a pure tree op the train step applies after
each optimizer update: ema <- lerp(ema, params, w_t), where t counts optimizer steps (state.step after it).

Two conventions, which agree on the first step (the average becomes a copy of the parameters):
- debias=True (the default), optax's `ema(decay, debias=True)`: the average of m_t = decay * m_{t-1} +
  (1 - decay) * p_t from m_0 = 0, divided by (1 - decay^t). Kept already divided, so the stored tree is
  usable weights: w_t = (1 - decay) / (1 - decay^t). For t << 1 / (1 - decay) it is close to the plain mean
  of the parameters so far.
- debias=False, torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(decay): a copy at t = 1,
  then w_t = 1 - decay. Early on it stays close to the first step's parameters.

An average started at step k > 0 (EMA turned on when a run resumes) starts from the current parameters;
both conventions then carry on as if every earlier step had had those parameters.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor


def weight(decay: Tensor, count: Tensor, debias: bool = True) -> Tensor:
    """The 0-D weight w_t that step t (1-based, int64) gives the new parameters; decay is a 0-D float64 tensor."""
    if debias:
        return (1 - decay) / (1 - decay**count)
    return torch.where(count == 1, torch.ones_like(decay), 1 - decay)


def update(ema: Any, params: Any, decay: Tensor, count: Tensor, debias: bool = True, inplace: bool = False) -> Any:
    """The average after step count: lerp(ema, params, w_t), leaf by leaf in each parameter's dtype
    (written into ema's tensors with inplace)."""
    w = weight(decay, count, debias)
    return optree.tree_map(lambda e, p: (e.lerp_ if inplace else e.lerp)(p, w.to(p.dtype)), ema, params)
