"""`minifn sweep`: K runs that differ in hyperparameters, trained together through one vmapped, compiled step.

Members share the model's shape, the tokenizer, the data and its order (each batch is read once and
broadcast to every member; a member whose --seed is not the order's records it as --shuffle-seed); they
differ in their state: parameters (a swept --seed), optimizer hyperparameters (0-D tensors in each member's
optimizer state), dropout rate and RNG key. Each member is an ordinary run: its own checkpoint and metrics
log in the sweep's folder, which generate, eval and plot read like any other. A member whose loss or gradient
norm becomes non-finite is frozen and reported; the others go on; if all of them do, the sweep stops as
minifn train does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from minifn import checkpoint, optim, trees
from minifn.checkpoint import CheckpointError, Progress
from minifn.config import Config, ConfigError, replace
from minifn.loop import Interrupted, MetricsLog, TrainingDiverged, _groups
from minifn.run import hyperparams_of, loss_from_config, precision_name, setup
from minifn.step import init_state
from minifn.sweep import make_sweep_step
from minifn.trees import stack_trees, unstack_trees

# What a sweep may vary: settings that live in each member's state, or (dropout) are passed per member.
SWEEPABLE = ("lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad", "warmup_steps", "momentum", "dampening",
             "dropout", "seed")


def grid(values: dict[str, list]) -> list[dict]:
    """Every combination of the swept values, the first setting varying slowest."""
    unknown = sorted(set(values) - set(SWEEPABLE))
    if unknown:
        raise ConfigError(f"cannot sweep {', '.join(unknown)}; a sweep varies {', '.join(SWEEPABLE)}")
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def member_name(values: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "base"


def _member(su, config: Config, path: Path):
    """(state, progress, header, id of the save that wrote its checkpoint or None) of one member: fresh, or
    resumed from its checkpoint."""
    header = checkpoint.make_header(config, su.tokenizer_info, su.data.identity)
    state = init_state(su.initial_params(config.run.seed), su.optimizer, seed=config.run.seed, ema=config.run.ema)
    progress, save_id = Progress(), None
    if path.exists() and not config.run.fresh:
        tensors, saved = checkpoint.load(path)
        refused, _ = checkpoint.resume_changes(Config.from_dict(saved["config"]), config)
        if saved["data"] != header["data"]:
            refused.append("the dataset's contents")
        if refused:
            raise CheckpointError(f"sweep member {path} cannot resume with these settings ({'; '.join(refused)}); "
                                  "use the same command, or --fresh")
        state, progress = checkpoint.load_state(tensors, saved, state)
        header["run_id"], save_id = saved["run_id"], saved.get("save_id")
    return state._replace(opt_state=optim.set_hyperparams(state.opt_state, **hyperparams_of(config.optim))), \
        progress, header, save_id


def train_sweep(config: Config, members: list[dict], folder: str | Path, *,
                on_event: Callable[[dict], None] = lambda e: None,
                stop_requested: Callable[[], int | None] = lambda: None, given: frozenset[str] | None = None) -> list:
    """Train (or resume) one run per entry of members (settings replacing config's); returns their states.

    Args:
      config: what every member shares (config.run.model is not used: members are saved in folder).
      members: per member, {setting: value} over SWEEPABLE; its checkpoint is folder/<member_name>.pt.
      folder: where the members' checkpoints and metrics logs go.
      on_event: receives "start", "step" (every member's loss), "diverged", "epoch" and "eval" events.
      stop_requested: returns a signal number when the sweep should save every member and stop.
      given: the settings the user set, as minifn.run.train takes them."""
    folder = Path(folder)
    su = setup(config, given=given)
    # one window order for all (the sweep's); each member records it, so that it resumes alone in that order
    order = su.spec.seed
    configs = [dataclasses.replace(replace(config, **values), model=su.config.model) for values in members]
    configs = [c if c.run.seed == order else replace(c, shuffle_seed=order) for c in configs]
    names = [member_name(values) for values in members]
    paths = [folder / f"{name}.pt" for name in names]
    rc = config.run
    if len({c.run.ema > 0 for c in configs}) != 1:
        raise ConfigError("--ema must be on for every member of a sweep or for none")
    if len({c.optim.has_momentum_buffer for c in configs}) != 1:
        raise ConfigError("--momentum must be above 0 for every member of an SGD sweep or for none (the momentum "
                          "buffer is part of the state the members share the shape of)")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two members of the sweep would be the same run: {', '.join(twice)}")
    if rc.init_from:  # the weights are the checkpoint's and the batch order the sweep's: a seed only draws masks
        runs: dict[tuple, list[str]] = {}
        for values, c, name in zip(members, configs, names):
            run = tuple(sorted((k, v) for k, v in values.items() if k != "seed" or c.run.dropout))
            runs.setdefault(run, []).append(name)
        if twins := next((group for group in runs.values() if len(group) > 1), None):
            raise ConfigError(f"with --init-from, {' and '.join(twins)} would be the same run: a seed only draws "
                              "dropout masks there (the weights come from the checkpoint and the batch order is "
                              "shared); sweep the seeds with --dropout above 0, or drop them")
    for flag, on in (("--log-gns", rc.log_gns), ("--save-every-steps", rc.save_every_steps),
                     ("--new-data", rc.new_data)):
        if on:
            raise ConfigError(f"minifn sweep does not support {flag} yet; use minifn train for that")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:  # as minifn train locks its checkpoint: one process per member
        for path in paths:
            locks.enter_context(checkpoint.locked(path))
        return _train_locked(su, config, folder, configs, names, paths, on_event, stop_requested)


def _complete_interrupted_save(paths: list[Path], save_ids: list[str | None]) -> bool:
    """Members from two saves (each checkpoint carries its save's id): a crash stopped save_together's
    renames, and every member still at the older save has the newer one complete in a temporary file. Rename
    those into place; whether there were any."""
    if len(set(save_ids)) < 2:
        return False
    for newest in set(save_ids) - {None}:
        behind = [path for path, s in zip(paths, save_ids) if s != newest]
        found = [checkpoint.temporary_for(path, lambda meta, n=newest: meta.get("save_id") == n) for path in behind]
        if all(found):
            for tmp, path in zip(found, behind):
                checkpoint.promote(tmp, path)
            return True
    return False


def _refuse_finished(folder: Path, progress: Progress, step: int, num_epochs: int, budget: int | None) -> None:
    """A rerun of a finished sweep is refused as minifn train refuses a finished run: it would train nothing,
    and a 'Sweep complete!' over an empty ranking reads as if it had."""
    if progress.epoch >= num_epochs:
        raise CheckpointError(f"the runs in {folder} have already trained {progress.epoch} epoch(s), and "
                              f"--num-epochs is {num_epochs}: nothing to do; raise --num-epochs to train further")
    if budget is not None and step >= budget:
        raise CheckpointError(f"the runs in {folder} have already taken {step} steps, the whole budget of this "
                              f"sweep ({budget}): nothing to do; raise --max-steps or --max-tokens")


def _train_locked(su, config: Config, folder: Path, configs: list[Config], names: list[str], paths: list[Path],
                  on_event, stop_requested) -> list:
    """train_sweep with every member's checkpoint locked: start or resume each member, train them together,
    save each (arguments as train_sweep's, and the members' configs, names and checkpoint paths)."""
    rc, spec = config.run, su.spec
    loaded = [_member(su, c, p) for c, p in zip(configs, paths)]
    if _complete_interrupted_save(paths, [m[3] for m in loaded]):
        loaded = [_member(su, c, p) for c, p in zip(configs, paths)]
    progress, headers = [m[1] for m in loaded], [m[2] for m in loaded]
    if len({(p.epoch, p.batch) for p in progress}) != 1:
        raise CheckpointError(f"the members in {folder} are at different positions; resume each alone, or --fresh")
    _refuse_finished(folder, progress[0], max(int(m[0].step) for m in loaded), rc.num_epochs, su.budget)
    for path in paths:
        checkpoint.remove_stale_temporaries(path)
    states = stack_trees([m[0] for m in loaded])
    step = make_sweep_step(su.config.model, su.optimizer, loss_from_config(rc.criterion, rc.label_smoothing),
                           reduction=rc.reduction, autocast_dtype=su.autocast_dtype,
                           dropout_rates=[c.run.dropout for c in configs], inplace=True, compile=rc.compile,
                           device=su.device)
    evaluate = su.evaluator()
    resumed = [p.exists() and not rc.fresh for p in paths]
    logs = [MetricsLog(checkpoint.metrics_path(p), h["run_id"], int(m[0].step), r)
            for p, h, m, r in zip(paths, headers, loaded, resumed)]
    done, per_epoch = progress[0], spec.batches_per_epoch(len(su.data.train))
    count, budget = int(states.step.max()), su.budget or math.inf
    frozen = [int(s) < count for s in states.step]  # a member that froze before the last save stays frozen
    on_event({"kind": "start", "members": names, "folder": folder, "resumed": any(resumed), "step": count,
              "steps_per_epoch": su.steps_per_epoch, "total_steps": su.total_steps, "tokens": len(su.data.train),
              "device": su.device.type, "compile": rc.compile,
              "precision": precision_name(su.autocast_dtype)})

    def evaluate_all(kind: str, extra: dict) -> None:
        for k, member in enumerate(unstack_trees(states)):
            event = {**extra, **(evaluate(member) if evaluate and not frozen[k] else {})}
            if kind == "epoch" and progress[k].tokens:
                p = progress[k]
                event["loss"] = p.loss_sum / p.tokens
                p.history.append([p.epoch + 1, event["loss"]])
            logs[k].write({"kind": kind, **event})
            on_event({"kind": kind, "member": names[k], "frozen": frozen[k], **event})

    def save_all() -> None:
        for log in logs:
            log.sync()
        save_id = uuid.uuid4().hex[:12]  # one per save: a crash in its renames leaves two ids among the members
        checkpoint.save_together([(path, *checkpoint.state_contents(member, p, {**header, "save_id": save_id}))
                                  for member, path, p, header in zip(unstack_trees(states), paths, progress, headers)])
        for log in logs:
            log.saved()

    try:
        while done.epoch < rc.num_epochs and count < budget:
            for group in _groups(su.data.train, spec, done.epoch, done.batch):
                if (signum := stop_requested()) is not None:
                    save_all()
                    raise Interrupted(signum, folder)
                x = torch.stack([g[0] for g in group]).to(su.device)
                y = torch.stack([g[1] for g in group]).to(su.device)
                states, m = step(states, (x, y))
                count += 1
                losses, tokens, stopped = torch.stack([m["loss"].double(), m["tokens"].double(),
                                                       m["frozen"].double()]).tolist()
                for k, p in enumerate(progress):
                    p.batch = min(p.batch + spec.grad_accum_steps, per_epoch)
                    if stopped[k] and not frozen[k]:
                        frozen[k] = True
                        kept = all(bool(leaf[k].isfinite().all()) for leaf in trees.leaves(states.params))
                        on_event({"kind": "diverged", "member": names[k], "step": count, "loss": losses[k],
                                  "finite_weights": kept})
                    if not frozen[k]:
                        p.loss_sum, p.tokens = p.loss_sum + losses[k] * tokens[k], p.tokens + int(tokens[k])
                        logs[k].write({"kind": "step", "step": count, "epoch": p.epoch + 1, "batch": p.batch,
                                       "batches": per_epoch, "loss": losses[k]})
                on_event({"kind": "step", "step": count, "losses": losses, "frozen": list(frozen)})
                if all(frozen):  # what minifn train does when its one run diverges
                    raise TrainingDiverged(f"every run of the sweep diverged by step {count}; the learning rates "
                                           "are probably too high; the checkpoints on disk are untouched")
                if rc.eval_every and count % rc.eval_every == 0 and evaluate:
                    evaluate_all("eval", {"step": count})
                if count >= budget:
                    break
            if done.batch < per_epoch:  # the step budget ended the sweep inside an epoch
                if evaluate and not rc.eval_every:  # its epoch events never come: evaluate the end, as train does
                    evaluate_all("eval", {"step": count})
                break
            evaluate_all("epoch", {"epoch": done.epoch + 1, "epochs": rc.num_epochs, "step": count})
            for p in progress:
                p.epoch, p.batch, p.loss_sum, p.tokens = p.epoch + 1, 0, 0.0, 0
            if (rc.save_every and done.epoch % rc.save_every == 0) or done.epoch == rc.num_epochs:
                save_all()
        if count >= budget and evaluate and rc.eval_every and count % rc.eval_every:
            evaluate_all("eval", {"step": count})
        save_all()
    finally:
        for log in logs:
            log.close()
    return unstack_trees(states)
