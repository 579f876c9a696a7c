"""The epoch loop around the pure step: batches in, checkpoints and metrics out.

This is the edge of the library: it moves batches to the device, stops on a non-finite loss, saves
atomically every `save_every` epochs, at the end and when interrupted, and reports each step and
epoch to a callback (the CLI prints; a script may collect). Resuming from a checkpoint's position
(epoch, batch) replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from minifn import checkpoint
from minifn.data import batches, eval_batches, num_batches
from minifn.losses import IGNORE_INDEX
from minifn.train import TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is left as it was."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state was saved (see .path) before this was raised."""

    def __init__(self, signum: int, path: Path | None = None):
        super().__init__(signum)
        self.signum, self.path = signum, path


@dataclass(frozen=True)
class DataSpec:
    seq_len: int
    stride: int
    batch_size: int
    grad_accum_steps: int = 1
    shuffle: bool = False
    seed: int = 0
    pad_id: int = 0
    rank: int = 0
    world_size: int = 1

    def batches_per_epoch(self, num_tokens: int) -> int:
        return num_batches(num_tokens, self.seq_len, self.stride, self.batch_size * self.world_size)

    def steps_per_epoch(self, num_tokens: int) -> int:
        return math.ceil(self.batches_per_epoch(num_tokens) / self.grad_accum_steps)


@dataclass
class Progress:
    """Where a run is, saved in every checkpoint: the next batch to train and the epoch's running sums."""

    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    history: list = field(default_factory=list)  # (epoch, avg loss) of finished epochs


# ----------------------------------------------------------------------------------- checkpoints


def save_state(path: Path, state: TrainState, progress: Progress, meta: dict) -> Path:
    tensors = {**checkpoint.flatten(state.params, "params"), **checkpoint.flatten(state.opt_state, "opt_state"),
               "step": state.step, "rng": state.rng}
    return checkpoint.save(path, tensors, {**meta, "progress": asdict(progress)})


def load_state(tensors: dict[str, Tensor], meta: dict, template: TrainState) -> tuple[TrainState, Progress]:
    """The state and progress stored in a loaded checkpoint, shaped and placed like template."""
    state = TrainState(checkpoint.unflatten(template.params, tensors, "params"),
                       checkpoint.unflatten(template.opt_state, tensors, "opt_state"),
                       tensors["step"].to(template.step.device), tensors["rng"].to(template.rng.device))
    return state, Progress(**meta["progress"])


# ----------------------------------------------------------------------------------------- loop


def _groups(tokens, spec: DataSpec, epoch: int, start: int):
    """Micro-batches stacked to [A, B, T]; a short final group is topped up with ignored batches."""
    it = batches(tokens, spec.seq_len, spec.stride, spec.batch_size, epoch=epoch, start=start,
                 shuffle=spec.shuffle, seed=spec.seed, pad_id=spec.pad_id, rank=spec.rank,
                 world_size=spec.world_size)
    group = []
    for x, y in it:
        group.append((x, y))
        if len(group) == spec.grad_accum_steps:
            yield group
            group = []
    if group:
        yield group + [(torch.full_like(x, spec.pad_id), torch.full_like(y, IGNORE_INDEX))] * (
            spec.grad_accum_steps - len(group))


def evaluate(eval_step, params, tokens, spec: DataSpec, device) -> tuple[float, int]:
    """(mean loss per target token, targets scored) over tokens, each target scored exactly once."""
    loss_sum, count = 0.0, 0
    for x, y in eval_batches(tokens, spec.seq_len, spec.stride, spec.batch_size, pad_id=spec.pad_id):
        out = eval_step(params, (x.to(device), y.to(device)))
        loss_sum, count = loss_sum + float(out["loss_sum"]), count + int(out["tokens"])
    return loss_sum / max(count, 1), count


def fit(state: TrainState, train_step: Callable, tokens, spec: DataSpec, *, num_epochs: int, device,
        checkpoint_path: Path, meta: dict, progress: Progress | None = None, save_every: int = 0,
        val_tokens=None, eval_step: Callable | None = None, lr_of: Callable[[TrainState], float] | None = None,
        report: Callable[[dict], None] = lambda event: None,
        stop_requested: Callable[[], int | None] = lambda: None) -> TrainState:
    """Train from progress (a fresh run when None) to the end of num_epochs; returns the final state.

    report receives {"kind": "step" | "epoch", ...}; stop_requested returns a signal number when the
    run should save and raise Interrupted (the CLI sets it from its signal handlers). In a data-parallel
    run (spec.rank/world_size) only rank 0 reports, writes metrics and saves; stop_requested must give
    the same answer on every rank."""
    progress = progress or Progress()
    main = spec.rank == 0
    metrics_path = checkpoint_path.with_suffix(".metrics.jsonl")
    per_epoch = spec.batches_per_epoch(len(tokens))

    def save():
        return save_state(checkpoint_path, state, progress, meta) if main else None

    with open(metrics_path if main else os.devnull, "a") as metrics_file:
        def log(event):
            metrics_file.write(json.dumps(event) + "\n")
            if main:
                report(event)

        while progress.epoch < num_epochs:
            epoch_start = time.perf_counter()
            for group in _groups(tokens, spec, progress.epoch, progress.batch):
                if (signum := stop_requested()) is not None:
                    raise Interrupted(signum, save())
                x = torch.stack([g[0] for g in group]).to(device, non_blocking=True)
                y = torch.stack([g[1] for g in group]).to(device, non_blocking=True)
                lr = lr_of(state) if lr_of else None
                step_start = time.perf_counter()
                new_state, m = train_step(state, (x, y))
                loss, count = float(m["loss"]), int(m["tokens"])  # one sync per step
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {int(state.step) + 1} (epoch {progress.epoch + 1}); "
                        f"the learning rate is probably too high; the last checkpoint is untouched")
                state = new_state
                progress.batch = min(progress.batch + spec.grad_accum_steps, per_epoch)
                progress.loss_sum += loss * count
                progress.tokens += count
                log({"kind": "step", "step": int(state.step), "epoch": progress.epoch + 1, "batch": progress.batch,
                     "batches": per_epoch, "loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                     "tokens_per_s": count / max(time.perf_counter() - step_start, 1e-9)})
            avg = progress.loss_sum / max(progress.tokens, 1)
            event = {"kind": "epoch", "epoch": progress.epoch + 1, "epochs": num_epochs, "step": int(state.step),
                     "loss": avg, "seconds": time.perf_counter() - epoch_start}
            if val_tokens is not None and eval_step is not None:
                event["val_loss"] = evaluate(eval_step, state.params, val_tokens, spec, device)[0]
            progress.history.append([progress.epoch + 1, avg])
            progress.epoch, progress.batch, progress.loss_sum, progress.tokens = progress.epoch + 1, 0, 0.0, 0
            if ((save_every and progress.epoch % save_every == 0) or progress.epoch == num_epochs) and main:
                event["checkpoint"] = str(save())
            log(event)
    return state
