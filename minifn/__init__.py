"""minifn: language-model training as pure functions over parameter trees.

    params = init_params(config, seed)            # a flat {name: tensor} pytree
    logits = apply(params, tokens, config)        # pure forward pass
    state = init_state(params, optim.adamw(...))  # params, optimizer state, step: plain data
    state, metrics = make_train_step(config, optimizer)(state, batch)
"""

from minifn import optim, schedules
from minifn.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from minifn.model import apply, init_params, num_params
from minifn.step import TrainState, eval_step, init_state, make_eval_step, make_train_step, train_step
from minifn.trees import stack_trees, unstack_trees

__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainState", "apply", "eval_step",
           "init_params", "init_state", "make_eval_step", "make_train_step", "num_params", "optim", "schedules",
           "stack_trees", "train_step", "unstack_trees"]
