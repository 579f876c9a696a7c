"""`minifn train`: the flags, resuming, progress output, signals and data-parallel launch."""

from __future__ import annotations

import math
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from minifn.cli.base import (
    DEFAULT_CHECKPOINT,
    DEFAULT_DATASET,
    UserError,
    bundled,
    cli,
    load_config_file,
    one_line_errors,
    resolve_device,
    resolve_dtype,
)
from minifn.config import CRITERIA, OPTIMIZERS, REDUCTIONS, SCHEDULERS, ModelConfig, TrainConfig


def _model_and_train_configs(o: dict, steps_per_epoch: int) -> tuple[ModelConfig, TrainConfig]:
    """Build both configs from the options; scheduler lengths given in epochs become steps."""
    model = ModelConfig(vocab_size=o["vocab_size"], embed_dim=o["embed_dim"], num_layers=o["num_layers"],
                        num_heads=o["num_heads"], head_dim=o["head_dim"], ff_dim=o["ff_dim"],
                        max_seq_len=o["max_seq_len"], bias=o["bias"], tie_embeddings=o["tie_embeddings"])
    epochs, scheduler = o["num_epochs"], o["scheduler"]
    lengths = {"step": ("step_size", o["step_size"] or max(1, epochs // 3)),  # only the active scheduler's
               "cosine": ("t_max", o["t_max"] or epochs), "linear": ("total_iters", o["total_iters"] or epochs)}
    in_steps = {}
    if scheduler in lengths:
        name, in_epochs = lengths[scheduler]
        in_steps[name] = in_epochs * steps_per_epoch
    train = TrainConfig(
        optimizer=o["optimizer"], lr=o["lr"], beta1=o["beta1"], beta2=o["beta2"], eps=o["eps"],
        weight_decay=o["weight_decay"], amsgrad=o["amsgrad"], momentum=o["momentum"], dampening=o["dampening"],
        nesterov=o["nesterov"], scheduler=o["scheduler"], gamma=o["gamma"], eta_min=o["eta_min"],
        start_factor=o["start_factor"], end_factor=o["end_factor"], warmup_steps=o["warmup_steps"],
        criterion=o["criterion"], reduction=o["reduction"], label_smoothing=o["label_smoothing"],
        dropout=o["dropout"], clip_grad=o["clip_grad"], grad_accum_steps=o["grad_accum_steps"], **in_steps)
    return model, train


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal aborts at once
    (the checkpoint on disk stays whole either way: saves are atomic)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self)
        return self


def _reporter(verbose: bool, criterion: str, total_steps: int, show: bool = True):
    """Prints progress: a tqdm bar on a terminal, else nothing per step; epoch lines always."""
    from tqdm import tqdm

    on_terminal = show and sys.stderr.isatty()
    bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False) if on_terminal else None

    def report(event):
        if event["kind"] == "step":
            if bar is not None:
                bar.n = event["step"]
                lr = f"{event['lr']:.2e}" if event["lr"] is not None else "-"
                bar.set_postfix_str(f"loss {event['loss']:.4f} lr {lr} {event['tokens_per_s']:.0f} tok/s")
            if verbose:
                line = (f"[Epoch: {event['epoch']}] [Batch: {event['batch']}/{event['batches']}] "
                        f"[Step: {event['step']}] [Loss: {event['loss']:.4f}]")
                (bar.write if bar is not None else click.echo)(line)
            return
        line = f"[Epoch: {event['epoch']}/{event['epochs']}] [Avg Loss: {event['loss']:.4f}]"
        if criterion == "cross_entropy":
            line += f" [Perplexity: {math.exp(min(event['loss'], 700)):.6f}]"
        if "val_loss" in event:
            line += f" [Val Loss: {event['val_loss']:.4f}]"
            if criterion == "cross_entropy":
                line += f" [Val Perplexity: {math.exp(min(event['val_loss'], 700)):.6f}]"
        (bar.write if bar is not None else click.echo)(line)

    return report, bar


@cli.command()
@click.option("--config", callback=load_config_file, is_eager=True, expose_value=False,
              type=click.Path(dir_okay=False), help="TOML file of option defaults.")
@click.option("--dataset", default=DEFAULT_DATASET, show_default=True, help="Plain-text training data.")
@click.option("--processor", "--tokenizer", "processor", default="mistral", show_default=True,
              help="SentencePiece model file, or 'mistral'.")
@click.option("--model", "checkpoint_path", default=DEFAULT_CHECKPOINT, show_default=True,
              help="Checkpoint to write (and to resume from if it exists).")
@click.option("--fresh", is_flag=True, help="Start over even if the checkpoint exists.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="cosine", show_default=True)
@click.option("--criterion", type=click.Choice(CRITERIA), default="cross_entropy", show_default=True)
@click.option("--reduction", type=click.Choice(REDUCTIONS), default="mean", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--batch-stride", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--grad-accum-steps", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--shuffle/--no-shuffle", default=True, show_default=True, help="Reshuffle windows every epoch.")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True,
              help="Hold out this tail of the tokens and evaluate on it every epoch.")
@click.option("--num-epochs", "--epochs", "num_epochs", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--save-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Save every N epochs (0: only at the end).")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--beta1", type=float, default=0.9, show_default=True)
@click.option("--beta2", type=float, default=0.999, show_default=True)
@click.option("--eps", type=float, default=1e-8, show_default=True, help="Optimizer epsilon.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--amsgrad", is_flag=True)
@click.option("--momentum", type=float, default=0.0, show_default=True)
@click.option("--dampening", type=float, default=0.0, show_default=True)
@click.option("--nesterov", is_flag=True)
@click.option("--clip-grad", type=float, default=1.0, show_default=True, help="Global-norm clip (0: off).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--step-size", type=click.IntRange(min=1), default=None, help="StepLR period in epochs [epochs/3].")
@click.option("--gamma", type=float, default=0.1, show_default=True)
@click.option("--t-max", type=click.IntRange(min=1), default=None, help="Cosine period in epochs [num-epochs].")
@click.option("--eta-min", type=float, default=0.0, show_default=True)
@click.option("--start-factor", type=float, default=1.0 / 3, show_default=True)
@click.option("--end-factor", type=float, default=1.0, show_default=True)
@click.option("--total-iters", type=click.IntRange(min=1), default=None, help="LinearLR length in epochs [num-epochs].")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout on the embedding and every residual branch (keyed by --seed and the step).")
@click.option("--num-layers", type=int, default=4, show_default=True)
@click.option("--num-heads", type=int, default=8, show_default=True)
@click.option("--head-dim", type=int, default=32, show_default=True)
@click.option("--embed-dim", type=int, default=256, show_default=True)
@click.option("--ff-dim", type=int, default=768, show_default=True)
@click.option("--bias/--no-bias", default=False, show_default=True)
@click.option("--tie-embeddings/--no-tie-embeddings", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="bfloat16 runs the forward pass under autocast; parameters stay float32.")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes, launched through torch.distributed.run (same as torchrun).")
@click.option("--verbose", is_flag=True, help="Per-batch lines, and tracebacks with errors.")
@one_line_errors
def train(**o):
    """Train a transformer on a text file; rerun the same command to resume."""
    import torch

    from minifn import checkpoint as ckpt
    from minifn.loop import DataSpec, Interrupted, TrainingDiverged, fit, load_state
    from minifn.model import init_params, num_params
    from minifn.optim import current_lr
    from minifn.tokenizer import encode_file, load_tokenizer
    from minifn.train import init_state, loss_from_config, make_eval_step, make_train_step, optimizer_from_config

    if o["nproc"] > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(_launch(o["nproc"]))
    warnings.showwarning = lambda msg, *a, **k: click.echo(f"Warning: {msg}", err=True)
    device = resolve_device(o["device"])
    world = None
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from minifn import distributed

        world = distributed.init(device)
        device = world.device
    rank, world_size = (world.rank, world.world_size) if world else (0, 1)
    say = click.echo if rank == 0 else (lambda *a, **k: None)
    autocast_dtype = resolve_dtype(o["dtype"], device)
    dataset = bundled(o["dataset"])
    tok = load_tokenizer(o["processor"])
    encoded = encode_file(tok, dataset)
    tokens = torch.from_numpy(encoded.ids.astype("int64"))
    val_tokens = None
    if o["val_fraction"] > 0:
        cut = int(len(tokens) * (1 - o["val_fraction"]))
        tokens, val_tokens = tokens[:cut], tokens[cut:]
        if len(val_tokens) < 2 or len(tokens) < 2:
            raise UserError(f"--val-fraction {o['val_fraction']} leaves too few tokens on one side "
                            f"of the split ({len(tokens)} train, {len(val_tokens)} validation)")
    if len(tokens) < 2:
        raise UserError(f"dataset {dataset} has {len(tokens)} token(s); training needs at least 2")
    if o["batch_stride"] > o["max_seq_len"]:
        raise UserError(f"--batch-stride {o['batch_stride']} is larger than --max-seq-len {o['max_seq_len']}: "
                        "tokens between windows would never be trained on")
    spec = DataSpec(o["max_seq_len"], o["batch_stride"], o["batch_size"], o["grad_accum_steps"], o["shuffle"],
                    o["seed"], tok.pad_id, rank, world_size)
    steps_per_epoch = spec.steps_per_epoch(len(tokens))
    model_config, train_config = _model_and_train_configs({**o, "vocab_size": tok.vocab_size}, steps_per_epoch)
    optimizer, schedule = optimizer_from_config(train_config)
    meta = {"model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
            "tokenizer": {"name": tok.name, "sha256": tok.sha256},
            "data": {"seq_len": spec.seq_len, "stride": spec.stride, "batch_size": spec.batch_size,
                     "shuffle": spec.shuffle, "seed": spec.seed, "val_fraction": o["val_fraction"]},
            "world_size": world_size}

    path = Path(o["checkpoint_path"])
    ckpt.remove_stale_temporaries(path)
    state = init_state(init_params(model_config, o["seed"], device=device), optimizer, seed=o["seed"])
    progress = None
    if path.exists() and not o["fresh"]:
        tensors, saved = ckpt.load(path)
        if saved.get("world_size", 1) != world_size:
            raise UserError(f"checkpoint {path} was saved by {saved.get('world_size', 1)} process(es) and this run "
                            f"has {world_size}; resume with --nproc {saved.get('world_size', 1)} or use --fresh")
        changed = _check_resumable(path, saved, meta)
        try:
            state, progress = load_state(tensors, saved, state)
        except ckpt.CheckpointError as e:
            raise UserError(f"{e}: the optimizer's state has another shape (was --optimizer, --amsgrad, --momentum "
                            "or --clip-grad changed?); resume with the original flags or use --fresh") from None
        say(f"Resuming from {path}: epoch {progress.epoch + 1}, batch {progress.batch}, step {int(state.step)}")
        if changed:
            say(f"Note: resuming with changed settings ({'; '.join(changed)})")
    elif o["fresh"] and rank == 0:
        path.with_suffix(".metrics.jsonl").unlink(missing_ok=True)
    if rank == 0:
        _check_writable(path)
    all_reduce = None
    if world:
        distributed.broadcast_(state.params)  # every rank starts from rank 0's parameters
        all_reduce = distributed.all_reduce_sum_

    loss_fn = loss_from_config(train_config)
    step = make_train_step(model_config, optimizer, loss_fn, reduction=train_config.reduction,
                           autocast_dtype=autocast_dtype, dropout_rate=train_config.dropout,
                           compile=o["compile_mode"], device=device, all_reduce=all_reduce, rank=rank)
    eval_step = (make_eval_step(model_config, loss_fn, autocast_dtype=autocast_dtype, compile=o["compile_mode"],
                                device=device) if val_tokens is not None else None)
    tokenized = "read from the token cache" if encoded.cached else f"tokenized in {encoded.seconds:.2f} s"
    say(f"Training {num_params(model_config) / 1e6:.2f}M parameters on {len(tokens)} tokens of {dataset} "
        f"({tokenized}; {steps_per_epoch} steps/epoch, {o['num_epochs']} epochs, device {device.type}, "
        f"compile {o['compile_mode']})")
    if world:
        say(f"Data parallel: {world_size} processes; global batch {spec.batch_size} x {world_size} x "
            f"{spec.grad_accum_steps} = {spec.batch_size * world_size * spec.grad_accum_steps} windows per step")
    report, bar = _reporter(o["verbose"], train_config.criterion, steps_per_epoch * o["num_epochs"], rank == 0)
    stop = _StopFlag().install()
    stop_requested = (lambda: stop.signum) if not world else (
        lambda: (stop.signum or signal.SIGTERM) if distributed.any_rank(stop.signum is not None, device) else None)
    try:
        fit(state, step, tokens, spec, num_epochs=o["num_epochs"], device=device, checkpoint_path=path, meta=meta,
            progress=progress, save_every=o["save_every"], val_tokens=val_tokens, eval_step=eval_step,
            lr_of=lambda s: float(current_lr(s.opt_state, schedule)), report=report,
            stop_requested=stop_requested)
    except Interrupted as e:
        if bar is not None:
            bar.close()  # before the message, so the bar does not overwrite it
        if rank == 0:
            click.echo(f"Interrupted: checkpoint saved to {e.path}; run the same command again to resume.",
                       err=True)
        sys.exit(128 + e.signum)
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
        if world:
            distributed.shutdown()
    say(f"Training complete! Checkpoint saved: {path}")


def _launch(nproc: int) -> int:
    """Run this same command in nproc processes through torch.distributed.run (torchrun)."""
    import subprocess

    args, given = [], iter(sys.argv[1:])
    for a in given:
        if a == "--nproc":
            next(given, None)  # and its value
        elif not a.startswith("--nproc="):
            args.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "minifn", *args]
    return subprocess.call(command)


def _check_resumable(path: Path, saved: dict, meta: dict) -> list[str]:
    """A checkpoint only resumes the same model with the same tokenizer: any difference is an error that
    names the fields (never a silent fresh start). Changed training or data settings are allowed (a new
    learning rate or more epochs is a normal thing to resume with) and returned, to be reported."""
    from minifn.checkpoint import CheckpointError

    def differences(key, cls=None):
        try:
            if cls is not None:
                return cls.from_dict(saved[key]).diff(cls.from_dict(meta[key]))
            return [f"{k}: {saved[key].get(k)!r} != {v!r}" for k, v in meta[key].items() if saved[key].get(k) != v]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} has an unreadable {key} ({e})") from None

    problems = differences("model_config", ModelConfig)
    if saved.get("tokenizer", {}).get("sha256") != meta["tokenizer"]["sha256"]:
        problems.append(f"tokenizer: {saved.get('tokenizer', {}).get('name')!r} != {meta['tokenizer']['name']!r}")
    if problems:
        raise CheckpointError(f"checkpoint {path} holds another model ({'; '.join(problems)}); use the same "
                              "flags to resume, another --model path, or --fresh to overwrite it")
    return differences("train_config", TrainConfig) + differences("data")


def _check_writable(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {path.parent} ({e.strerror})") from None

