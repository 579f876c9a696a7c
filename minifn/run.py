"""A whole training run from a Config: what `minifn train` does, callable from a script.

    from minifn.config import Config, RunConfig
    from minifn.run import train
    state = train(Config(run=RunConfig(num_epochs=3)), on_event=print)

`train` tokenizes, splits, resumes (applying changed settings, refusing those that break exact resume),
builds and compiles the step, and runs the loop. It prints nothing and installs no handlers: events go
to `on_event`, and `stop_requested` says when to save and stop. The CLI adds flags, printing, signals
and exit codes on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minifn import checkpoint, onednn, optim, schedules
from minifn.checkpoint import CheckpointError
from minifn.config import Config, ConfigError, ModelConfig, OptimConfig, flag
from minifn.data import num_windows
from minifn.loop import DataSpec, fit
from minifn.loop import evaluate as evaluate_tokens
from minifn.losses import LOSSES, Loss, cross_entropy, perplexity
from minifn.model import init_params, num_params
from minifn.step import TrainState, init_state, make_eval_step, make_train_step


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA where present, else the CPU; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def native_bfloat16(device: torch.device) -> bool:
    """Whether device multiplies bfloat16 in hardware, so that autocast pays: CUDA GPUs from Ampere on, and
    x86 CPUs with AVX512-BF16 or AMX (with AVX512-BF16, benchmarks/train_step.py ran 2.2-2.8x faster)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)() for isa in ("avx512_bf16", "amx_tile"))
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype (None: no autocast); auto is bfloat16 where it is native."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else None
    if name == "float32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use --dtype float32")
    return torch.bfloat16


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    return "float32" if autocast_dtype is None else f"{str(autocast_dtype).removeprefix('torch.')} autocast"


def optimizer_from_config(oc: OptimConfig, steps_per_epoch: int, total_steps: int):
    """(optimizer, schedule) for an OptimConfig; scheduler lengths in epochs become steps, and default to
    the whole run. Clipping and the warm-up are always in the state (off is an infinite threshold and 0 steps),
    so a resume can change them and a sweep can vary them."""
    epochs = lambda n, default: default if n is None else n * steps_per_epoch  # noqa: E731
    schedule = schedules.make(oc.scheduler, step_size=max(1, epochs(oc.step_size, total_steps // 3)), gamma=oc.gamma,
                              t_max=max(1, epochs(oc.t_max, total_steps)), eta_min=oc.eta_min,
                              start_factor=oc.start_factor, end_factor=oc.end_factor,
                              total_iters=max(1, epochs(oc.total_iters, total_steps)))
    if oc.optimizer == "sgd":
        tx = optim.sgd(oc.lr, oc.momentum, oc.dampening, oc.weight_decay, oc.nesterov, schedule, oc.warmup_steps)
    else:
        make = optim.adam if oc.optimizer == "adam" else optim.adamw
        tx = make(oc.lr, (oc.beta1, oc.beta2), oc.eps, oc.weight_decay, oc.amsgrad, schedule, oc.warmup_steps)
    return optim.chain(optim.clip_by_global_norm(oc.clip_grad or float("inf")), tx), schedule


def hyperparams_of(oc: OptimConfig) -> dict[str, float]:
    """The values an OptimConfig sets in the optimizer state (what a resumed run applies)."""
    values = {"lr": oc.lr, "weight_decay": oc.weight_decay, "max_norm": oc.clip_grad or float("inf"),
              "warmup_steps": oc.warmup_steps}
    if oc.optimizer == "sgd":
        return {**values, **({"momentum": oc.momentum, "dampening": oc.dampening} if oc.momentum else {})}
    return {**values, "b1": oc.beta1, "b2": oc.beta2, "eps": oc.eps}


def loss_from_config(criterion: str, label_smoothing: float = 0.0) -> Loss:
    """The criterion by name, with its label smoothing (cross-entropy only)."""
    if label_smoothing:
        return functools.partial(cross_entropy, label_smoothing=label_smoothing)
    return LOSSES[criterion]


@dataclasses.dataclass(frozen=True)
class Data:
    """The run's tokens: train and validation sequences (read per window, never loaded whole) and identity."""

    train: object  # a minifn.corpus.TokenSequence
    val: object | None
    identity: dict  # {"sha256", "tokens"}: recorded in checkpoints, compared on resume
    cached: bool
    seconds: float
    val_bytes: int | None = None  # UTF-8 bytes of the validation text, where the corpus records them
    val_starts_document: bool = False  # the validation split begins a document (else it is a tail cut)


def load_data(dc, tok) -> Data:
    """--dataset as token sequences: a prepared corpus folder with its fixed split, or a text file through
    the token cache, cut by --val-fraction (the tail of its tokens)."""
    from minifn.corpus import open_corpus
    from minifn.tokenizer import encode_file

    start = time.perf_counter()
    if Path(dc.dataset).is_dir():
        if dc.val_fraction:
            raise ConfigError(f"--val-fraction cuts a text file; {dc.dataset} is a prepared corpus whose split was "
                              "fixed by minifn prepare (--val-fraction or --val-tokens there)")
        corpus, cached = open_corpus(dc.dataset, tok.sha256, vocab_size=tok.vocab_size), True
        train, val = corpus.train, corpus.val
        val_bytes = corpus.manifest.text_bytes("val") if val is not None else None
    else:
        encoded = encode_file(tok, dc.dataset)
        corpus, cached, train, val, val_bytes = encoded.corpus, encoded.cached, encoded.ids, None, None
        if dc.val_fraction:
            cut = int(len(train) * (1 - dc.val_fraction))
            train, val = train.view(0, cut), train.view(cut)
            if len(val) < 2 or len(train) < 2:
                raise ConfigError(f"--val-fraction {dc.val_fraction} leaves too few tokens on one side of the "
                                  f"split ({len(train)} train, {len(val)} validation)")
    if len(train) < 2:
        raise ConfigError(f"dataset {dc.dataset} has {len(train)} token(s); training needs at least 2")
    identity = {"sha256": corpus.manifest.content_sha256, "tokens": corpus.manifest.tokens}
    starts_document = corpus.manifest.split["rule"] == "documents"  # a file's --val-fraction cuts mid-document
    return Data(train, val, identity, cached, time.perf_counter() - start, val_bytes, starts_document)


def run_length(steps_per_epoch: int, num_epochs: int, budget: int | None, start: int = 0) -> int:
    """The step the run ends at: num_epochs epochs after step start, or the step budget, whichever is sooner."""
    return min(start + steps_per_epoch * num_epochs, budget or math.inf)


def step_budget(rc, tokens_per_step: int) -> int | None:
    """The step at which --max-steps or --max-tokens ends the run, whichever is sooner (None: neither set)."""
    budgets = [rc.max_steps] if rc.max_steps else []
    if rc.max_tokens:
        budgets.append(max(1, math.ceil(rc.max_tokens / tokens_per_step)))
    return min(budgets) if budgets else None


def best_path(path: Path) -> Path:
    """Where the checkpoint with the lowest validation loss is kept: mini.pt -> mini.best.pt."""
    return path.with_name(f"{path.stem}.best{path.suffix}")


def _evaluator(eval_step, val_tokens, tok, spec: DataSpec, device, val_bytes: int | None = None,
               starts_document: bool = False) -> Callable[[TrainState], dict]:
    """evaluate(state) -> validation loss, perplexity and bits per byte of the validation text (val_bytes, as a
    prepared corpus records them for minifn eval, or else counted from the tokens as prepare counts them), of
    the parameters and, for a state with an EMA, of the average too (as ema_val_loss, ...)."""
    from minifn.prepare import text_bytes

    num_bytes = max(1, val_bytes or text_bytes(val_tokens, tok, starts_document))

    def scores(params, prefix: str) -> dict:
        loss, count = evaluate_tokens(eval_step, params, val_tokens, spec, device)
        return {f"{prefix}val_loss": loss, f"{prefix}val_perplexity": perplexity(loss),
                f"{prefix}val_bpb": loss * count / math.log(2) / num_bytes, f"{prefix}val_tokens": count}

    def evaluate(state: TrainState) -> dict:
        return {**scores(state.params, ""), **(scores(state.ema, "ema_") if state.ema else {})}

    return evaluate


def _init_source(source: str, device, max_seq_len: int) -> tuple[dict, ModelConfig, str]:
    """(params, model config, tokenizer sha256) of --init-from: a minifn checkpoint or a Hugging Face folder
    (whose sliding window, if any, is checked against the run's context, max_seq_len)."""
    from minifn.tokenizer import sha256_file

    if Path(source).is_dir():
        from minifn.hf import load_pretrained

        params, model, tokenizer_path = load_pretrained(source, device, max_seq_len=max_seq_len)
        return params, model, sha256_file(tokenizer_path)
    params, model, meta = checkpoint.load_params(source, device)
    return params, model, meta["tokenizer"]["sha256"]


def _refuse_padding_only_shapes(num_tokens: int, spec: DataSpec) -> None:
    """A window longer than the training data, or a batch of more windows than the data has, would be
    padding that costs compute and memory and trains nothing: refused, with the largest value that fits."""
    if num_tokens - 1 < spec.seq_len:
        raise ConfigError(f"--max-seq-len {spec.seq_len} is longer than the training data ({num_tokens} tokens): "
                          f"the window would be mostly padding; use --max-seq-len {num_tokens - 1} or less")
    windows = num_windows(num_tokens, spec.seq_len, spec.stride)
    if spec.batch_size * spec.world_size > windows:
        across = f" for {spec.world_size} processes" if spec.world_size > 1 else ""
        fits = (f"use --batch-size {windows // spec.world_size} or less" if windows >= spec.world_size
                else "use fewer processes")
        raise ConfigError(f"--batch-size {spec.batch_size} is more than the {windows} windows in the training data"
                          f"{across} (--max-seq-len {spec.seq_len}, --batch-stride {spec.stride}): every batch would "
                          f"be padded; {fits}, or a smaller --batch-stride")


def _refuse_shape_settings(asked: ModelConfig, loaded: ModelConfig, source: str, given: frozenset[str] | None) -> None:
    """--init-from fixes the architecture (all but the context length): a shape setting the user gave (in given;
    None: every one changed from its default) that differs from the loaded model's is refused, as a setting
    that does not apply is."""
    def set_by_user(f):
        return f.name in given if given is not None else getattr(asked, f.name) != f.default

    clashes = [f"{flag(f.name)} {getattr(asked, f.name)} (it has {getattr(loaded, f.name)})"
               for f in dataclasses.fields(ModelConfig) if f.name not in ("vocab_size", "max_seq_len")
               and set_by_user(f) and getattr(asked, f.name) != getattr(loaded, f.name)]
    if clashes:
        raise ConfigError(f"--init-from {source} fixes the model's shape, and {'; '.join(clashes)} would change it; "
                          "drop them (only --max-seq-len may differ)")


def _resume(path: Path, header: dict, template: TrainState, config: Config, budget: int | None):
    """(state, progress, applied changes, whether the data is new) from the checkpoint at path, or a
    CheckpointError naming what makes it another run: another model, tokenizer, data, process count, or a
    setting that breaks resume."""
    tensors, saved = checkpoint.load(path)
    if "progress" not in saved:
        raise CheckpointError(f"checkpoint {path} holds parameters only; train from it with --init-from {path} "
                              "and another --model path")
    if saved["world_size"] != header["world_size"]:
        raise CheckpointError(f"checkpoint {path} was saved by {saved['world_size']} process(es) and this run has "
                              f"{header['world_size']}; resume with --nproc {saved['world_size']} or use --fresh")
    if saved["tokenizer"]["sha256"] != header["tokenizer"]["sha256"]:
        raise CheckpointError(f"checkpoint {path} was trained with tokenizer {saved['tokenizer']['name']!r}, not "
                              f"{header['tokenizer']['name']!r}; use the same --tokenizer, or --fresh")
    refused, applied = checkpoint.resume_changes(Config.from_dict(saved["config"]), config)
    new_data = saved["data"] != header["data"]
    if new_data and not config.run.new_data:
        refused.append(f"the dataset's contents ({saved['data']['tokens']} tokens, sha256 "
                       f"{saved['data']['sha256'][:12]} != {header['data']['tokens']} tokens, "
                       f"{header['data']['sha256'][:12]}; --new-data keeps the model and restarts the data)")
    if refused:
        raise CheckpointError(f"checkpoint {path} cannot resume with these settings ({'; '.join(refused)}); use the "
                              "checkpoint's settings, another --model path, or --fresh")
    state, progress = checkpoint.load_state(tensors, saved, template)
    if new_data:  # the epochs count again on the new data; the step budget does not restart
        progress = checkpoint.Progress(history=progress.history)
        applied.append("new data: the data position restarts at epoch 1")
    elif progress.epoch >= config.run.num_epochs:
        raise CheckpointError(f"checkpoint {path} has already trained {progress.epoch} epoch(s), and "
                              f"--num-epochs is {config.run.num_epochs}: nothing to do; raise --num-epochs to "
                              "train further")
    if budget is not None and int(state.step) >= budget:
        raise CheckpointError(f"checkpoint {path} has already taken {int(state.step)} steps, the whole budget of "
                              f"this run ({budget}): nothing to do; raise --max-steps or --max-tokens")
    header["run_id"] = saved["run_id"]
    return state, progress, applied, new_data


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run derives from its config before it touches a checkpoint (shared by train and sweeps)."""

    config: Config  # with the tokenizer's vocabulary, or --init-from's architecture
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: object  # minifn.tokenizer.Tokenizer
    tokenizer_info: dict  # name, sha256 and absolute path, for checkpoint headers
    data: Data
    spec: DataSpec
    steps_per_epoch: int
    budget: int | None  # the step --max-steps or --max-tokens ends the run at
    total_steps: int  # what the schedule spans
    optimizer: optim.GradientTransformation
    schedule: optim.Schedule
    init: tuple | None  # (params, model config, tokenizer sha256) of --init-from

    def initial_params(self, seed: int):
        return init_params(self.config.model, seed, device=self.device) if self.init is None else self.init[0]

    def evaluator(self, loss_fn: Loss | None = None) -> Callable[[TrainState], dict] | None:
        """evaluate(state) on the validation split (None without one). It runs eagerly: a forward pass is a
        small part of a run, and a second compiled graph would cost a second compile."""
        if self.data.val is None:
            return None
        rc = self.config.run
        loss_fn = loss_fn or loss_from_config(rc.criterion, rc.label_smoothing)
        step = make_eval_step(self.config.model, loss_fn, autocast_dtype=self.autocast_dtype, compile="off",
                              device=self.device)
        val = self.data.val.view(0, rc.eval_tokens + 1) if rc.eval_tokens else self.data.val
        whole = len(val) == len(self.data.val)  # the corpus's byte count is the whole split's
        return _evaluator(step, val, self.tokenizer, self.spec, self.device, self.data.val_bytes if whole else None,
                          self.data.val_starts_document)


def setup(config: Config, device: torch.device | None = None, rank: int = 0, world_size: int = 1,
          given: frozenset[str] | None = None) -> Setup:
    """Tokenizer, data, batching, run length and optimizer for config, with every check that needs them."""
    from minifn.tokenizer import MISTRAL, load_tokenizer, mistral_model_path

    rc, dc = config.run, config.data
    device = device or resolve_device(rc.device)
    autocast_dtype = resolve_dtype(rc.dtype, device)
    if rc.log_gns and dc.grad_accum_steps * world_size < 2:
        raise ConfigError("--log-gns compares micro-batch gradients with their sum and needs two or more per step; "
                          "set --grad-accum-steps 2 or more (or train with --nproc 2 or more)")
    tok = load_tokenizer(dc.tokenizer)
    tok_path = str((mistral_model_path() if dc.tokenizer == MISTRAL else Path(dc.tokenizer)).resolve())
    def refuse_eval_without_validation():
        if rc.eval_every or rc.eval_tokens:
            raise ConfigError(f"{'--eval-every' if rc.eval_every else '--eval-tokens'} needs a validation split; "
                              "set --val-fraction (or train on a prepared corpus that has one)")

    if not dc.val_fraction and not Path(dc.dataset).is_dir():  # a text file: known before tokenizing it
        refuse_eval_without_validation()
    data = load_data(dc, tok)
    if data.val is None:
        refuse_eval_without_validation()
    if dc.batch_stride > config.model.max_seq_len:
        raise ConfigError(f"--batch-stride {dc.batch_stride} is larger than --max-seq-len {config.model.max_seq_len}:"
                          " tokens between windows would never be trained on")
    init = _init_source(rc.init_from, device, config.model.max_seq_len) if rc.init_from else None
    if init is None:
        model = dataclasses.replace(config.model, vocab_size=tok.vocab_size)
    elif init[2] != tok.sha256:
        raise ConfigError(f"--init-from {rc.init_from} was trained with another tokenizer than --tokenizer "
                          f"{dc.tokenizer}; pass the tokenizer it was trained with")
    else:
        _refuse_shape_settings(config.model, init[1], rc.init_from, given)
        model = dataclasses.replace(init[1], max_seq_len=config.model.max_seq_len)
    config = dataclasses.replace(config, model=model)
    spec = DataSpec(model.max_seq_len, dc.batch_stride, dc.batch_size, dc.grad_accum_steps, dc.shuffle,
                    rc.seed if dc.shuffle_seed < 0 else dc.shuffle_seed, tok.pad_id, rank, world_size)
    _refuse_padding_only_shapes(len(data.train), spec)
    steps_per_epoch = spec.steps_per_epoch(len(data.train))
    budget = step_budget(rc, dc.batch_size * world_size * dc.grad_accum_steps * spec.seq_len)
    total_steps = run_length(steps_per_epoch, rc.num_epochs, budget)
    optimizer, schedule = optimizer_from_config(config.optim, steps_per_epoch, total_steps)
    return Setup(config, device, autocast_dtype, tok, {"name": tok.name, "sha256": tok.sha256, "path": tok_path},
                 data, spec, steps_per_epoch, budget, total_steps, optimizer, schedule, init)


def train(config: Config, *, on_event: Callable[[dict], None] = lambda event: None,
          stop_requested: Callable[[], int | None] = lambda: None, loss_fn: Loss | None = None,
          given: frozenset[str] | None = None) -> TrainState:
    """Run (or resume) the training that config describes and return the final state.

    Args:
      config: every setting of the run (minifn.config.Config); config.run.model is the checkpoint.
      on_event: receives {"kind": "start" | "step" | "epoch" | "eval", ...} events (rank 0 only).
      stop_requested: returns a signal number when the run should save and stop (raises loop.Interrupted).
      loss_fn: a loss(logits, targets, reduction) to use instead of config.run.criterion.
      given: the settings the user set (the command line's flags, environment and --config file), so that
        --init-from refuses a shape flag given at its default; None: those that differ from their defaults."""
    rc = config.run
    world, device = None, resolve_device(rc.device)
    from minifn import distributed

    if distributed.launched():
        world = distributed.init(device)
        device = world.device
        asked = stop_requested  # every rank must stop at the same step
        stop_requested = lambda: (  # noqa: E731
            (asked() or signal.SIGTERM) if distributed.any_rank(asked() is not None, device) else None)
    rank, world_size = (world.rank, world.world_size) if world else (0, 1)
    su = setup(config, device, rank, world_size, given)
    config, dc = su.config, config.data
    header = checkpoint.make_header(config, su.tokenizer_info, su.data.identity, world_size)
    path = checkpoint.target(rc.model)
    checkpoint.refuse_to_overwrite(path, {"dataset": dc.dataset, "tokenizer": su.tokenizer_info["path"]})
    with checkpoint.locked(path) if rank == 0 else contextlib.nullcontext():
        if rank == 0:  # the lock's holder only: another rank could remove a running save's temporary
            checkpoint.remove_stale_temporaries(path)
        state = init_state(su.initial_params(rc.seed), su.optimizer, seed=rc.seed, ema=rc.ema)
        progress, applied = None, []
        if path.exists() and path.stat().st_size and not rc.fresh:  # an empty file is a place to write
            state, progress, applied, new_data = _resume(path, header, state, config, su.budget)
            if new_data:  # --num-epochs counts epochs of the new data, after the steps already taken
                total = run_length(su.steps_per_epoch, rc.num_epochs, su.budget, start=int(state.step))
                optimizer, schedule = optimizer_from_config(config.optim, su.steps_per_epoch, total)
                su = dataclasses.replace(su, total_steps=total, optimizer=optimizer, schedule=schedule)
        # The config is the truth for every hyperparameter, restored state or not.
        state = state._replace(opt_state=optim.set_hyperparams(state.opt_state, **hyperparams_of(config.optim)))
        all_reduce = None
        if world:
            distributed.broadcast_((state.params, state.ema))  # every rank starts from rank 0's parameters
            all_reduce = distributed.all_reduce_sum_
        loss_fn = loss_fn or loss_from_config(rc.criterion, rc.label_smoothing)
        onednn.route_setting()  # a mistyped MINIFN_LINEAR is the user's error before any compile, not inside it
        # The loop never looks back at an old state, so each step may overwrite it: one copy of the trees.
        step = make_train_step(config.model, su.optimizer, loss_fn, reduction=rc.reduction,
                               autocast_dtype=su.autocast_dtype, dropout_rate=rc.dropout, log_gns=rc.log_gns,
                               inplace=True, compile=rc.compile, device=device, all_reduce=all_reduce, rank=rank)
        evaluate = su.evaluator(loss_fn)
        if rank == 0:
            on_event({"kind": "start", "path": path, "resumed": progress is not None, "changes": applied,
                      "epoch": progress.epoch if progress else 0, "batch": progress.batch if progress else 0,
                      "step": int(state.step), "params": num_params(config.model), "tokens": len(su.data.train),
                      "dataset": dc.dataset, "cached": su.data.cached, "seconds": su.data.seconds,
                      "corpus": Path(dc.dataset).is_dir(), "steps_per_epoch": su.steps_per_epoch,
                      "total_steps": su.total_steps, "device": device.type, "world_size": world_size,
                      "precision": precision_name(su.autocast_dtype),
                      "batch_size": dc.batch_size, "grad_accum_steps": dc.grad_accum_steps})
        try:
            state = fit(state, step, su.data.train, su.spec, num_epochs=rc.num_epochs, max_steps=su.budget,
                       device=device, checkpoint_path=path, header=header, progress=progress,
                       save_every=rc.save_every, save_every_steps=rc.save_every_steps, evaluate=evaluate,
                       eval_every=rc.eval_every, best_path=best_path(path),
                       lr_of=lambda s: optim.current_lr(s.opt_state, su.schedule), report=on_event,
                       stop_requested=stop_requested)
            if world:
                distributed.shutdown(wait=True)
            return state
        finally:
            if world:
                distributed.shutdown()
