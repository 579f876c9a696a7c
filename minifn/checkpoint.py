"""Checkpoints: flat tensor dicts plus a JSON header, written atomically, loaded without pickle code.

On disk: torch.save({"format": ..., "meta": json string, "tensors": {name: tensor}}) where names are
safetensors-style flat keys ("params.blocks.0.attn.qkv.weight", "opt_state.0.mu.embed.weight").
A save goes to a temporary file in the same folder, is flushed and fsynced, then renamed over the
old one, so a crash at any moment leaves either the old or the new checkpoint, never half of one.
Loading uses weights_only=True: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

FORMAT = "minifn-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the problem."""


def _entry_name(entry) -> str:
    return str(getattr(entry, "field", None) or entry.entry)


def flatten(tree: Any, prefix: str) -> dict[str, Tensor]:
    """{'prefix.path.to.leaf': tensor} for every tensor leaf of a pytree."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    return {".".join([prefix, *map(_entry_name, a)]): leaf for a, leaf in zip(accessors, leaves)}


def unflatten(template: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """A tree shaped like template whose leaves come from tensors (names as flatten writes them)."""
    names = list(flatten(template, prefix))
    missing = [n for n in names if n not in tensors]
    extra = sorted(k for k in tensors if k.startswith(prefix + ".") and k not in set(names))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"checkpoint {prefix} do not match this model/optimizer ({detail})")
    leaves = optree.tree_leaves(template)
    for name, leaf in zip(names, leaves):
        if tensors[name].shape != leaf.shape:
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {tuple(leaf.shape)}")
    restored = [tensors[n].to(device=leaf.device, dtype=leaf.dtype) for n, leaf in zip(names, leaves)]
    return optree.tree_unflatten(optree.tree_structure(template), restored)


def save(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Atomically write tensors (moved to CPU) and a JSON-serialisable meta dict to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format": FORMAT, "meta": json.dumps(meta),
               "tensors": {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
            raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); {kept}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete temporary files that a killed save left beside path; returns how many."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def load(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) from a checkpoint, or a CheckpointError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says more
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(f"checkpoint {path} was refused: it asks to run {refused.group(1)}, and loading "
                                  "never executes code; only use checkpoints you trust") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a tensor file that loads without "
                              "running code); delete it or start over with --fresh") from None
    except Exception as e:  # noqa: BLE001 - random bytes raise anything (IndexError, KeyError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                              "delete it or start over with --fresh") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minifn checkpoint")
    try:
        return payload["tensors"], json.loads(payload["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} has a damaged header") from None
