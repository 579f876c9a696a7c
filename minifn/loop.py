"""The epoch loop around the pure step: batches in, checkpoints and metrics out.

This is the edge of the library: it moves batches to the device, stops on a non-finite loss, saves
atomically every `save_every` epochs, at the end and when interrupted, and reports each step and epoch
to a callback. A step's metrics are read one step late, in one transfer, so on a GPU the host queues
step k+1 before it waits for step k. Resuming from a checkpoint's position (epoch, batch) replays
exactly the batches an uninterrupted run would have seen, and the metrics log is cut back to the
checkpoint's step, so a crash neither loses nor duplicates a line.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minifn import checkpoint, noise
from minifn.checkpoint import Progress
from minifn.data import batches, eval_batches, num_batches
from minifn.losses import IGNORE_INDEX
from minifn.step import TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is left as it was."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state was saved (see .path) before this was raised."""

    def __init__(self, signum: int, path: Path | None = None):
        super().__init__(signum)
        self.signum, self.path = signum, path


@dataclass(frozen=True)
class DataSpec:
    """How tokens become batches: window length and stride, rows per micro-batch, accumulation, order."""

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


class MetricsLog:
    """The JSONL log of step and epoch events beside a checkpoint. Lines carry the run's id; a resumed run
    first drops lines past its checkpoint's step (and other runs' lines), a fresh run drops older runs'
    lines at its first save, so a killed fresh run leaves the old checkpoint's history whole."""

    def __init__(self, path: Path, run_id: str, step: int, resumed: bool, enabled: bool = True):
        self.path, self.run_id, self.enabled, self.compacted = path, run_id, enabled, resumed
        if enabled and resumed and path.exists():
            self._rewrite(lambda e: e.get("run") == run_id and e.get("step", 0) <= step)
        self.file = open(path if enabled else os.devnull, "a")

    def _rewrite(self, keep: Callable[[dict], bool]) -> None:
        lines = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(event, dict) and keep(event):
                lines.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.path)

    def write(self, event: dict) -> None:
        self.file.write(json.dumps({**event, "run": self.run_id}) + "\n")

    def sync(self) -> None:
        """Flush to disk: called before every checkpoint write, so every saved step has its line."""
        self.file.flush()
        if self.enabled:
            os.fsync(self.file.fileno())

    def saved(self) -> None:
        """After a checkpoint write: the first one of a fresh run drops older runs' lines."""
        if self.enabled and not self.compacted:
            self.file.close()
            self._rewrite(lambda e: e.get("run") == self.run_id)
            self.file, self.compacted = open(self.path, "a"), True

    def close(self) -> None:
        self.file.close()


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
        checkpoint_path: Path, header: dict, progress: Progress | None = None, max_steps: int | None = None,
        save_every: int = 0, save_every_steps: int = 0, evaluate: Callable[[TrainState], dict] | None = None,
        eval_every: int = 0, best_path: Path | None = None,
        lr_of: Callable[[TrainState], torch.Tensor] | None = None, report: Callable[[dict], None] = lambda e: None,
        stop_requested: Callable[[], int | None] = lambda: None) -> TrainState:
    """Train from progress (a fresh run when None) until num_epochs or max_steps, whichever comes first.

    Args:
      state: the TrainState to start from (restored from the checkpoint when resuming).
      train_step: step(state, (inputs, targets)) -> (state, metrics with loss, grad_norm, tokens).
      tokens: the training token ids (a tensor, or any sequence minifn.data.batches reads).
      spec: how tokens become batches (and this process's rank in data parallel).
      num_epochs: train until this many epochs are done ...
      max_steps: ... or until state.step reaches this (None: no step budget).
      device: where batches go.
      checkpoint_path: where to save; the metrics log sits beside it (checkpoint.metrics_path).
      header: the checkpoint header (checkpoint.make_header).
      progress: the position to resume from; None starts a fresh run.
      save_every: save every this many epochs (0: only at the end); the end and interrupts always save.
      save_every_steps: also save every this many steps (0: never by steps).
      evaluate: evaluate(state) -> {"val_loss": ..., ...} on the validation split.
      eval_every: evaluate every this many steps and at the end, as "eval" events; 0 evaluates at the end
        of every epoch instead, in the epoch event (and at a step budget's end inside an epoch, as an eval).
      best_path: where to keep the checkpoint with the lowest validation loss, when there is an evaluate
        (None: not kept). A fresh run removes an older run's file there at its first save, as the metrics
        log drops that run's history, so it never sits beside a checkpoint it does not belong to.
      lr_of: the learning rate of the next step as a 0-D tensor, for the log.
      report: receives every event, {"kind": "step" | "epoch" | "eval", ...} (rank 0 only).
      stop_requested: returns a signal number when the run should save and raise Interrupted; it must
        give the same answer on every rank."""
    resumed = progress is not None
    progress = progress or Progress()
    main = spec.rank == 0
    per_epoch = spec.batches_per_epoch(len(tokens))
    step = int(state.step)
    max_steps = max_steps or float("inf")
    log = MetricsLog(checkpoint.metrics_path(checkpoint_path), header["run_id"], step, resumed, main)
    pending = None  # the last step's metrics, read after the next step is queued
    smoothed = noise.Smoothed()  # running averages of the noise-scale estimates (--log-gns)

    def emit(event):
        log.write(event)
        if main:
            report(event)

    def resolve(end: float | None = None):
        """Read the pending step's metrics; it ran from its launch to end (the next launch, or now)."""
        nonlocal pending, smoothed
        if pending is None:
            return
        values, at, epoch, batch, started = pending
        pending = None
        loss, grad_norm, count, lr, *gns = values.tolist()  # one device-to-host transfer per step
        smoothed, gns_fields = noise.log_fields(smoothed, *gns)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss} at step {at} (epoch {epoch}); the learning rate is "
                                   "probably too high; the last checkpoint is untouched")
        progress.loss_sum += loss * count
        progress.tokens += int(count)
        seconds = (end or time.perf_counter()) - started
        emit({"kind": "step", "step": at, "epoch": epoch, "batch": batch, "batches": per_epoch, "loss": loss,
              "lr": None if math.isnan(lr) else lr, "grad_norm": grad_norm, "tokens_per_s": count / max(seconds, 1e-9),
              **gns_fields})

    stale_best = not resumed and best_path is not None  # until this run saves, a file there is another run's

    def save(path=checkpoint_path):
        nonlocal stale_best
        resolve()
        log.sync()
        if not main:
            return None
        saved = checkpoint.save_state(path, state, progress, header)
        if stale_best and path != best_path:  # a fresh run's first save: an older run's best is not its own
            best_path.unlink(missing_ok=True)
        stale_best = False
        if path == checkpoint_path:
            log.saved()
        return saved

    def run_eval() -> dict:
        resolve()
        result = evaluate(state)
        if best_path is not None and (progress.best_val is None or result["val_loss"] < progress.best_val):
            progress.best_val = result["val_loss"]
            result["best"] = str(save(best_path))
        return result

    try:
        while progress.epoch < num_epochs and step < max_steps:
            epoch_start = time.perf_counter()
            for group in _groups(tokens, spec, progress.epoch, progress.batch):
                if (signum := stop_requested()) is not None:
                    raise Interrupted(signum, save())
                x = torch.stack([g[0] for g in group]).to(device, non_blocking=True)
                y = torch.stack([g[1] for g in group]).to(device, non_blocking=True)
                lr = lr_of(state) if lr_of else None
                started = time.perf_counter()
                state, m = train_step(state, (x, y))
                step += 1
                progress.batch = min(progress.batch + spec.grad_accum_steps, per_epoch)
                values = torch.stack([m["loss"].detach(), m["grad_norm"], m["tokens"],
                                      m["loss"].new_tensor(float("nan")) if lr is None else lr,
                                      *(m[k] for k in noise.METRICS if k in m)]).to(torch.float64)
                resolve(end=started)
                pending = (values, step, progress.epoch + 1, progress.batch, started)
                last = step >= max_steps or (progress.epoch + 1 == num_epochs and progress.batch == per_epoch)
                if evaluate is not None and eval_every and (step % eval_every == 0 or last):
                    emit({"kind": "eval", "step": step, "epoch": progress.epoch + 1, **run_eval()})
                if save_every_steps and step % save_every_steps == 0 and not last:
                    save()
                if last:
                    break
            resolve()
            if progress.batch < per_epoch:  # the step budget ended the run inside this epoch
                if evaluate is not None and not eval_every:  # its epoch event never comes: evaluate the end
                    emit({"kind": "eval", "step": step, "epoch": progress.epoch + 1, **run_eval()})
                break
            avg = progress.loss_sum / max(progress.tokens, 1)
            event = {"kind": "epoch", "epoch": progress.epoch + 1, "epochs": num_epochs, "step": step,
                     "loss": avg, "seconds": time.perf_counter() - epoch_start}
            if evaluate is not None and not eval_every:
                event.update(run_eval())
            progress.history.append([progress.epoch + 1, avg])
            progress.epoch, progress.batch, progress.loss_sum, progress.tokens = progress.epoch + 1, 0, 0.0, 0
            saving = (save_every and progress.epoch % save_every == 0) or progress.epoch == num_epochs
            if saving and main:
                event["checkpoint"] = str(checkpoint_path)
            emit(event)
            if saving and step < max_steps:
                save()
        if step >= max_steps:
            save()
    finally:
        log.close()
    return state
