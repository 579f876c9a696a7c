"""Stacking parameter trees along a new leading axis, for ensembles under torch.func.vmap.

    states = stack_trees([init_state(init_params(config, s), tx) for s in range(8)])
    step = torch.compile(torch.func.vmap(functools.partial(train_step, config=config, optimizer=tx)))
    states, metrics = step(states, stacked_batches)    # eight models, one call
    members = unstack_trees(states)
"""

from __future__ import annotations

from typing import Any

import optree
import torch


def stack_trees(trees: list[Any]) -> Any:
    """One tree whose leaves are the input trees' leaves stacked on a new dimension 0."""
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_trees(tree: Any) -> list[Any]:
    """The inverse of stack_trees: a list of trees, one per index of dimension 0."""
    leaves, spec = optree.tree_flatten(tree)
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(leaves[0].shape[0])]
