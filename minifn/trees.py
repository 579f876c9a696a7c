"""Leaves of a tree in a form torch.compile traces quickly, and stacking trees along a new leading axis,
for ensembles under torch.func.vmap.

    states = stack_trees([init_state(init_params(config, s), tx) for s in range(8)])
    step = torch.compile(torch.func.vmap(functools.partial(train_step, config=config, optimizer=tx)))
    states, metrics = step(states, stacked_batches)    # eight models, one call
    members = unstack_trees(states)
"""

from __future__ import annotations

from typing import Any

import optree
import torch


def leaves(tree: Any) -> list:
    """optree.tree_leaves(tree): dict values by sorted key, sequences in order, no leaves for None.

    Compiled, the walk is written out here for string-keyed dicts, tuples, lists and named tuples (anything
    else goes to optree): dynamo traces optree's flatten through a Python stand-in, node by node, and a
    flatten and unflatten of 40 leaves cost it 0.25 s, about ten of them per step. Its native tree_map is
    faster still, but visits dicts in insertion order, which would pair one tree's leaves with another's."""
    if not torch.compiler.is_compiling():
        return optree.tree_leaves(tree)
    found = []
    _collect(tree, found)
    return found


def rebuild(tree: Any, new_leaves: list) -> Any:
    """tree's structure with new_leaves in place of leaves(tree), in that order (optree.tree_unflatten)."""
    if not torch.compiler.is_compiling():
        return optree.tree_unflatten(optree.tree_structure(tree), new_leaves)
    each = iter(new_leaves)
    rebuilt = _replace(tree, each)
    if next(each, _END) is not _END:
        raise ValueError(f"{len(new_leaves)} leaves for a tree of {len(leaves(tree))}")
    return rebuilt


_END = object()  # what the leaves' iterator returns once exhausted


def _is_str_dict(tree) -> bool:
    """A plain dict with string keys, whose order optree sorts (other keys it may not sort: left to it)."""
    return type(tree) is dict and all(isinstance(key, str) for key in tree)


def _is_namedtuple(tree) -> bool:
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def _collect(tree, found: list) -> None:
    if isinstance(tree, torch.Tensor):
        found.append(tree)
    elif _is_str_dict(tree):
        for key in sorted(tree):
            _collect(tree[key], found)
    elif type(tree) in (tuple, list) or _is_namedtuple(tree):
        for child in tree:
            _collect(child, found)
    elif tree is not None:
        found.extend(optree.tree_leaves(tree))


def _next(each):
    leaf = next(each, _END)
    if leaf is _END:
        raise ValueError("fewer leaves than the tree has")
    return leaf


def _replace(tree, each):
    if isinstance(tree, torch.Tensor):
        return _next(each)
    if _is_str_dict(tree):
        new = {key: _replace(tree[key], each) for key in sorted(tree)}
        return {key: new[key] for key in tree}  # the tree's own key order, as optree keeps it
    if _is_namedtuple(tree):
        return type(tree)(*[_replace(child, each) for child in tree])
    if type(tree) in (tuple, list):
        return type(tree)([_replace(child, each) for child in tree])
    if tree is None:
        return None
    return optree.tree_unflatten(optree.tree_structure(tree), [_next(each) for _ in optree.tree_leaves(tree)])


def replace(named: tuple, **changes) -> tuple:
    """named._replace(**changes), written as a call of its class: torch 2.11's dynamo cannot return a named
    tuple that _replace made from one created in the same graph, and every compiled step's state is (the
    compiled function rebuilds its input trees, see compiling._lowering_scalars)."""
    return type(named)(**{**named._asdict(), **changes})


def stack_trees(trees: list[Any]) -> Any:
    """One tree whose leaves are the input trees' leaves stacked on a new dimension 0."""
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_trees(tree: Any) -> list[Any]:
    """The inverse of stack_trees: a list of trees, one per index of dimension 0."""
    leaves, spec = optree.tree_flatten(tree)
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(leaves[0].shape[0])]
