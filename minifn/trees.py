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
    rebuilt, used = _replace(tree, list(new_leaves), 0)
    if used != len(new_leaves):
        raise ValueError(f"{len(new_leaves)} leaves for a tree of {used}")
    return rebuilt


# Compiled, dynamo interprets every bytecode of these walks (and a call is a frame of its own), so a node whose
# children are all tensors (a parameter dict, a list of moments) is taken whole, by slices and zips, rather
# than leaf by leaf: about a third of the bytecodes dynamo ran for a train step were these walks.


def _key_order(keys: tuple) -> tuple[list, list] | None:
    """(a dict's keys sorted as optree orders them, each key's position in that order) if all keys are strings;
    None for other keys (left to optree). Compiled, dynamo calls it and takes the result as a constant (see
    below), instead of interpreting a test and a sort per key."""
    if not all(isinstance(key, str) for key in keys):
        return None
    order = sorted(keys)
    position = {key: i for i, key in enumerate(order)}
    return order, [position[key] for key in keys]


# torch._dynamo.assume_constant_result(_key_order), without importing dynamo (1.5 s) where nothing compiles;
# tests/test_trees.py checks that the decorator still marks functions so.
_key_order._dynamo_marked_constant = True


def _children(tree) -> list | None:
    """The children of a dict with string keys, tuple, list or named tuple, in optree's order; else None."""
    if type(tree) is dict:
        order = _key_order(tuple(tree))
        return None if order is None else [tree[key] for key in order[0]]
    if type(tree) in (tuple, list) or (isinstance(tree, tuple) and hasattr(tree, "_fields")):
        return list(tree)
    return None


def _all_tensors(children: list) -> bool:
    return False not in [isinstance(child, torch.Tensor) for child in children]


def _collect(tree, found: list) -> None:
    if isinstance(tree, torch.Tensor):
        found.append(tree)
        return
    children = _children(tree)
    if children is None:
        if tree is not None:
            found.extend(optree.tree_leaves(tree))
    elif _all_tensors(children):
        found.extend(children)
    else:
        for child in children:
            _collect(child, found)


def _taken(new_leaves: list, at: int, count: int) -> list:
    if at + count > len(new_leaves):
        raise ValueError("fewer leaves than the tree has")
    return new_leaves[at:at + count]


def _replace(tree, new_leaves: list, at: int):
    """(tree rebuilt from new_leaves[at:], the index after the leaves it took)."""
    if isinstance(tree, torch.Tensor):
        return _taken(new_leaves, at, 1)[0], at + 1
    children = _children(tree)
    if children is None:
        if tree is None:
            return None, at
        count = len(optree.tree_leaves(tree))
        return optree.tree_unflatten(optree.tree_structure(tree), _taken(new_leaves, at, count)), at + count
    if _all_tensors(children):
        return _like(tree, _taken(new_leaves, at, len(children))), at + len(children)
    new = []
    for child in children:
        rebuilt, at = _replace(child, new_leaves, at)
        new.append(rebuilt)
    return _like(tree, new), at


def _like(tree, children: list):
    """A node of tree's kind with these children (in optree's order)."""
    if type(tree) is dict:  # in the tree's own key order, as optree keeps it
        return {key: children[i] for key, i in zip(tree, _key_order(tuple(tree))[1])}
    if type(tree) in (tuple, list):
        return type(tree)(children)
    return type(tree)(*children)  # a named tuple


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
