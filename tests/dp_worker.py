"""Run by torchrun in test_distributed: 5 data-parallel steps, then each rank saves its parameters."""

import sys

import torch

from minifn import distributed, optim
from minifn.data import batches
from minifn.model import init_params
from minifn.step import init_state, make_train_step

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_config  # noqa: E402

CONFIG, BATCH, STEPS = tiny_config(), 3, 5


def tokens():
    return torch.randint(0, CONFIG.vocab_size, (400,), generator=torch.Generator().manual_seed(7))


def optimizer():
    return optim.adamw(lr=3e-3, weight_decay=0.1)


if __name__ == "__main__":
    world = distributed.init(torch.device("cpu"))
    tx = optimizer()
    state = init_state(init_params(CONFIG, seed=world.rank), tx)  # different on purpose: the broadcast fixes it
    distributed.broadcast_(state.params)
    step = make_train_step(CONFIG, tx, compile="off", all_reduce=distributed.all_reduce_sum_)
    data = batches(tokens(), 16, 8, BATCH, shuffle=True, seed=3, rank=world.rank, world_size=world.world_size)
    for _ in range(STEPS):
        state, _ = step(state, next(data))
    torch.save(state.params, f"{sys.argv[1]}/rank{world.rank}.pt")
    distributed.shutdown(wait=True)
