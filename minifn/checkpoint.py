"""The checkpoint format, in one place: flat tensors plus a validated JSON header, written atomically.

On disk: torch.save({"format": FORMAT, "meta": json string, "tensors": {name: tensor}}) where names are
safetensors-style flat keys: "params.blocks.0.attn.qkv.weight", "opt_state.0.mu.embed.weight", "step",
"rng". A save goes to a temporary file in the target's folder, is flushed and fsynced, then renamed
over the old one, so a crash at any moment leaves either the old or the new checkpoint. Loading uses
weights_only=True: a pickle that tries to run code is refused. The header is checked against a schema
before anything reads it, so an old, crafted or damaged header is one clear error.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from minifn.config import REFUSE, SECTIONS, Config, ConfigError, ModelConfig
from minifn.files import fsync_dir
from minifn.model import misfit

FORMAT = "minifn-checkpoint-2"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's container


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the problem."""


@dataclass
class Progress:
    """Where a run is: the next batch to train, the epoch's running sums, and finished epochs' losses."""

    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    history: list = field(default_factory=list)  # [epoch, avg loss] of finished epochs
    best_val: float | None = None  # the lowest validation loss so far (the best checkpoint's)


# ----------------------------------------------------------------------------------- flat trees


def _entry_name(entry) -> str:
    return str(getattr(entry, "field", None) or entry.entry)


def flatten(tree: Any, prefix: str) -> dict[str, Tensor]:
    """{'prefix.path.to.leaf': tensor} for every tensor leaf of a pytree."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    return {".".join([prefix, *map(_entry_name, a)]): leaf for a, leaf in zip(accessors, leaves)}


def _added_hyperparameters(template: Any, tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The template's values for 0-D hyperparameters a checkpoint lacks (saved before the optimizer kept
    them, e.g. the warm-up length): the run's config sets every hyperparameter on resume anyway."""
    from minifn.optim import HYPERPARAMETERS

    return {name: leaf for name, leaf in flatten(template, prefix).items()
            if name not in tensors and leaf.ndim == 0 and name.rsplit(".", 1)[-1] in HYPERPARAMETERS}


def unflatten(template: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """A tree shaped like template whose leaves come from tensors (names as flatten writes them)."""
    names = list(flatten(template, prefix))
    tensors = {**_added_hyperparameters(template, tensors, prefix), **tensors}
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


# ------------------------------------------------------------------------------------- the file


def target(path: str | os.PathLike) -> Path:
    """The file a save to path writes: a symlink is followed (written through), a dangling one refused."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} is a symlink to {os.readlink(path)}, which does not exist; "
                                  "create the target's folder or point --model elsewhere")
        return Path(os.path.realpath(path))
    return path


def _compact(tensor: Tensor) -> Tensor:
    """tensor on the CPU in memory of its own: torch.save writes a view's whole storage, so a sweep member's
    slice of the stacked states would carry every member's tensors."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def save(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Atomically write tensors (moved to CPU) and a JSON-serialisable meta dict to path (through a symlink)."""
    return save_together([(path, tensors, meta)])[0]


def save_together(items: list[tuple[str | os.PathLike, dict[str, Tensor], dict]]) -> list[Path]:
    """save for several (path, tensors, meta) at once, such that a crash leaves each path old or new and the
    new ones can always be completed: every file is written (and fsynced) to a temporary beside its path
    before the first is renamed into place, so a path still old after a crash in the renames has its new
    version complete in a temporary (temporary_for). A sweep saves its members this way. It needs the disk
    space of every new file at once, beside the old ones."""
    paths = [target(path) for path, _, _ in items]
    temporaries: list[Path] = []
    renaming, renamed = False, 0
    try:
        for path, (_, tensors, meta) in zip(paths, items):
            temporaries.append(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"format": FORMAT, "meta": json.dumps(meta),
                       "tensors": {k: _compact(v) for k, v in tensors.items()}}
            with open(temporaries[-1], "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        for folder in {path.parent for path in paths}:  # the temporaries outlive a power cut, before any rename
            fsync_dir(folder)
        renaming = True
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
            renamed += 1
    except BaseException as e:
        if not renamed:  # every path is old: drop the new versions; else the rest are completed from them
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        full = getattr(e, "errno", None) == errno.ENOSPC or "enforce fail" in str(e) or "No space" in str(e)
        reason = "the disk is full" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0][:120])
        if renamed:
            raise CheckpointError(f"could not finish writing {paths[renamed]} ({reason}); {renamed} of "
                                  f"{len(paths)} checkpoints are new: run the same command again to complete "
                                  "the rest from their temporary files") from None
        path = paths[0] if renaming else paths[len(temporaries) - 1]  # the one being renamed or written
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"could not write checkpoint {path} ({reason}); {kept}") from None
    for folder in {path.parent for path in paths}:
        fsync_dir(folder)
    return paths


def temporary_for(path: str | os.PathLike, wanted: Callable[[dict], bool]) -> Path | None:
    """A complete temporary file beside path whose header wanted() accepts (the new version that
    save_together wrote before a crash stopped its renames), or None."""
    path = target(path)
    for tmp in sorted(_temporaries(path)):
        try:
            _, meta = load(tmp)
        except CheckpointError:  # a temporary a crash cut short: not the one
            continue
        if wanted(meta):
            return tmp
    return None


def promote(tmp: Path, path: str | os.PathLike) -> None:
    """Rename a temporary (temporary_for's) into place, durably."""
    path = target(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _temporaries(path: Path) -> list[Path]:
    """The temporary files save_together writes beside path (.NAME.PID.tmp), from any process."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.tmp")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)] if path.parent.is_dir() else []


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete temporary files that a killed save left beside path; returns how many."""
    path = target(path)
    stale = _temporaries(path)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def load(path: str | os.PathLike, *, suggest_fresh: bool = True) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) from a checkpoint, or a CheckpointError that says what is wrong with the file.

    suggest_fresh: a damaged or foreign-format file's message ends with 'start over with --fresh', the way
    out for the commands that resume from it (train, sweep); readers without that flag (generate, eval,
    export, --init-from) pass False and get the message without it."""
    path, fresh = Path(path), " or start over with --fresh" if suggest_fresh else ""
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
                              f"running code); delete it{fresh}") from None
    except Exception as e:  # noqa: BLE001 - random bytes raise anything (IndexError, KeyError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                              f"delete it{fresh}") from None
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("minifn-checkpoint"):
        raise CheckpointError(f"{path} is not a minifn checkpoint")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload['format']}, written by another version of "
                              f"minifn (this one reads {FORMAT}); retrain it{fresh}")
    try:
        tensors, meta = payload["tensors"], json.loads(payload["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} has a damaged header") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise CheckpointError(f"checkpoint {path} has a damaged tensor table")
    return tensors, validate_header(meta, path)


def refuse_to_overwrite(path: Path, inputs: dict[str, str | os.PathLike]) -> None:
    """Raise unless path may be replaced by a checkpoint: it must be absent or a minifn checkpoint (a torch
    zip container, possibly damaged), and none of the run's input files."""
    path = target(path)
    if path.is_dir():
        raise CheckpointError(f"--model {path} is a directory; give a file path such as {path / 'mini.pt'}")
    for what, other in inputs.items():
        if other and path.exists() and Path(other).exists() and os.path.samefile(path, other):
            raise CheckpointError(f"--model {path} is the run's {what}; writing a checkpoint there would destroy it")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                raise CheckpointError(f"--model {path} exists and is not a minifn checkpoint; refusing to overwrite "
                                      "it (choose another --model path)")


@contextmanager
def locked(path: Path):
    """An advisory lock beside the checkpoint, held for a run: a second run on the same file is refused."""
    path = target(path)
    lock_path = path.with_name(f".{path.name}.lock")
    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock_path, "a+")
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {path.parent} ({e.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise CheckpointError(f"checkpoint {path} is in use by another minifn process (pid {owner}); wait for "
                                  "it to finish or choose another --model path") from None
        # the holder unlinks the file as it ends: a lock taken on that unlinked file guards nothing, so take it
        # again on the file now at lock_path
        try:
            if os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield path
    finally:
        lock_path.unlink(missing_ok=True)
        f.close()


# ----------------------------------------------------------------------------------- the header


def _require(meta: dict, key: str, kind, path, optional=False):
    value = meta.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"checkpoint {path} has a damaged header ({key} is missing or not a "
                              f"{getattr(kind, '__name__', kind)})")
    return value


def validate_header(meta: Any, path) -> dict:
    """meta itself if it has the fields and types this version writes, else a CheckpointError naming one."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has a damaged header (not a table)")
    config = _require(meta, "config", dict, path)
    try:
        if "progress" in meta:
            Config.from_dict(config)
        else:  # parameters only (an import): the model section is enough
            ModelConfig.from_dict(_require(config, "model", dict, path))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unusable config ({e})") from None
    tokenizer = _require(meta, "tokenizer", dict, path)
    for key in ("name", "sha256"):
        _require(tokenizer, key, str, path)
    if "progress" in meta:
        progress = _require(meta, "progress", dict, path)
        for key, kind in (("epoch", int), ("batch", int), ("loss_sum", (int, float)), ("tokens", int),
                          ("history", list)):
            _require(progress, key, kind, path)
        unknown = set(progress) - {f.name for f in dataclasses.fields(Progress)}
        if unknown:
            raise CheckpointError(f"checkpoint {path} has a damaged header (unknown progress fields {sorted(unknown)})")
        _require(meta, "world_size", int, path)
        _require(meta, "run_id", str, path)
        data = _require(meta, "data", dict, path)
        _require(data, "sha256", str, path)
        _require(data, "tokens", int, path)
    return meta


def resume_changes(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """(refused, applied): the settings that differ between a checkpoint and this run, split by the policy
    each field declares (REFUSE: breaks exact resume or is another model; else applied from now on)."""
    refused, applied = [], []
    for name, section in SECTIONS.items():
        mine, theirs = getattr(saved, name), getattr(new, name)
        for f in dataclasses.fields(section):
            if name == "run" and f.name in ("fresh", "new_data", "model"):
                continue
            old, value = getattr(mine, f.name), getattr(theirs, f.name)
            if old != value:
                (refused if f.metadata["on_resume"] == REFUSE else applied).append(f"{f.name}: {old!r} != {value!r}")
    if saved.optim.has_momentum_buffer != new.optim.has_momentum_buffer:
        refused.append(f"momentum: {saved.optim.momentum!r} != {new.optim.momentum!r} turns SGD momentum on or off, "
                       "which reshapes the optimizer state")
    return refused, applied


def make_header(config: Config, tokenizer: dict, data: dict, world_size: int = 1, run_id: str | None = None) -> dict:
    """The header of a training checkpoint (save_state adds the progress).

    tokenizer: {"name", "sha256", "path"}; data: {"sha256", "tokens"}, the dataset's identity."""
    import uuid

    return {"config": config.to_dict(), "tokenizer": tokenizer, "data": data, "world_size": world_size,
            "run_id": run_id or uuid.uuid4().hex[:12]}


# ------------------------------------------------------------------------------------ the state


def save_state(path: Path, state, progress: Progress, header: dict) -> Path:
    """A TrainState (params, opt_state, step, rng, and the EMA as "ema.<param name>") and the run's progress,
    atomically."""
    return save(path, *state_contents(state, progress, header))


def state_contents(state, progress: Progress, header: dict) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) that save_state writes, refused if the parameters do not fit the header's model."""
    tensors = {**flatten(state.params, "params"), **flatten(state.opt_state, "opt_state"),
               "step": state.step, "rng": state.rng, **flatten(state.ema, "ema")}
    meta = {**header, "progress": asdict(progress)}
    _refuse_unloadable(tensors, meta)
    return tensors, meta


def _refuse_unloadable(tensors: dict[str, Tensor], meta: dict) -> None:
    """A checkpoint that load would refuse (a header short of what validate_header asks, parameters or an EMA
    that do not fit the header's model config) is a caller's mistake, refused before anything is written."""
    try:
        validate_header(meta, "(new)")
    except CheckpointError as e:
        raise ValueError(f"refusing to save a checkpoint that could not be loaded: {e}") from None
    config = ModelConfig.from_dict(meta["config"]["model"])
    for prefix in ("params.", "ema."):
        part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if prefix == "ema." and not part:  # trained without an EMA
            continue
        why = misfit(part, config)
        if why:
            raise ValueError(f"refusing to save a checkpoint whose {prefix[:-1]} do not fit its header's model "
                             f"config: {why}")


def load_state(tensors: dict[str, Tensor], meta: dict, template):
    """(state, progress) from a loaded checkpoint, shaped and placed like template (a TrainState).

    The EMA follows the template: kept if it has one (started from the loaded parameters when the checkpoint
    has none, i.e. EMA turned on at resume; its decay is the template's), dropped if it has none."""
    for key in ("step", "rng"):
        if key not in tensors or tensors[key].shape != ():
            raise CheckpointError(f"checkpoint has no usable {key} tensor")
    params = unflatten(template.params, tensors, "params")
    ema = template.ema
    if optree.tree_leaves(ema):
        saved = any(k.startswith("ema.") for k in tensors)
        ema = unflatten(ema, tensors, "ema") if saved else optree.tree_map(torch.clone, params)
    state = template._replace(params=params, opt_state=unflatten(template.opt_state, tensors, "opt_state"),
                              step=tensors["step"].to(template.step.device, torch.int64),
                              rng=tensors["rng"].to(template.rng.device, torch.int64), ema=ema)
    return state, Progress(**meta["progress"])


def save_params(path: Path, params: dict[str, Tensor], model: ModelConfig, tokenizer: dict) -> Path:
    """A parameters-only checkpoint (no optimizer, no progress): generate, eval and --init-from read it."""
    tensors, meta = flatten(params, "params"), {"config": {"model": model.to_dict()}, "tokenizer": tokenizer}
    _refuse_unloadable(tensors, meta)
    return save(path, tensors, meta)


def load_params(path: str | os.PathLike, device=None,
                weights: str = "raw") -> tuple[dict[str, Tensor], ModelConfig, dict]:
    """(params, model config, header) of any minifn checkpoint, checked against the config's shapes;
    weights='ema' reads the moving average of a run trained with --ema instead."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    tensors, meta = load(path, suggest_fresh=False)
    config = ModelConfig.from_dict(meta["config"]["model"])
    prefix = {"raw": "params.", "ema": "ema."}[weights]
    params = {k.removeprefix(prefix): v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
    if weights == "ema" and not params:
        raise CheckpointError(f"checkpoint {path} has no EMA weights: it was trained without --ema; "
                              "use --weights raw")
    why = misfit(params, config)
    if why:
        raise CheckpointError(f"checkpoint {path} holds parameters that do not fit its own model config ({why})")
    return params, config, meta


def trained_tokenizer(meta: dict, path, tokenizer: str | None = None):
    """The tokenizer a checkpoint was trained with: the model file it records (by the path training resolved,
    or 'mistral'), or tokenizer where that file moved; either must have the recorded sha256."""
    from minifn.tokenizer import MISTRAL, load_tokenizer

    recorded = meta["tokenizer"]
    name = tokenizer or (MISTRAL if recorded["name"] == MISTRAL else recorded.get("path") or recorded["name"])
    if not tokenizer and name != MISTRAL and not Path(name).is_file():
        raise CheckpointError(f"{path} was trained with tokenizer {name}, which is not there any more; "
                              "point --tokenizer at a copy of it")
    tok = load_tokenizer(name)
    if tok.sha256 != recorded["sha256"]:
        raise CheckpointError(f"tokenizer {name} is not the one {path} was trained with (sha256 differs)")
    return tok


def metrics_path(path: str | os.PathLike) -> Path:
    """The per-step metrics log of a checkpoint: its own name plus .metrics.jsonl, never shared."""
    path = Path(path)
    return path.with_name(path.name + ".metrics.jsonl")
