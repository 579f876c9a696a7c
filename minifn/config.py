"""Every setting in one place: frozen dataclasses whose fields carry the default, the help text, the
unit and what a resumed run does when the value changes.

The Click options of `minifn train`, its TOML keys and MINIFN_TRAIN_* variables (all named after the
field), and the checkpoint header are derived from these classes, so a default changed here changes
everywhere. Validation happens on construction and raises ConfigError naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "linear")
CRITERIA = ("cross_entropy", "mse", "mae")
REDUCTIONS = ("mean", "sum")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
COMPILE_MODES = ("auto", "on", "off")
MAX_SEED = 2**32 - 1

# What a resumed run does with a setting whose value differs from the checkpoint's.
APPLY, REFUSE = "apply", "refuse"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and why."""


def setting(default, help: str, *, on_resume: str = APPLY, choices: tuple | None = None, cli: bool = True,
            aliases: tuple[str, ...] = (), unit: str = "", only_for: tuple[str, tuple[str, ...]] | None = None):
    """A dataclass field with the metadata the CLI, the config file and resume read.

    on_resume: APPLY (a changed value takes effect) or REFUSE (it breaks exact resume: an error).
    only_for: (setting, values) where this setting means something; a non-default value elsewhere is refused."""
    meta = dict(help=help, on_resume=on_resume, choices=choices, cli=cli, aliases=aliases, unit=unit,
                only_for=only_for)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value, kind, *, minimum=None, positive=False, below=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{flag(name)} must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{flag(name)} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{flag(name)} must be at least {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ConfigError(f"{flag(name)} must be below {below}, got {value!r}")


class Settings:
    """Shared behaviour: strict types, choices, JSON round trip, field-by-field differences."""

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"unknown {flag(f.name)} {value!r}; choose one of: {', '.join(choices)}")
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{flag(f.name)} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)):
                _check_number(f.name, value, int if isinstance(default, int) else float)
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"{flag(f.name)} must be a string, got {value!r}")
            elif default is None and value is not None:
                _check_number(f.name, value, int, positive=True)

    def _check_only_for(self) -> None:
        """Refuse a setting that the chosen optimizer or scheduler would ignore."""
        for f in dataclasses.fields(self):
            only_for = f.metadata.get("only_for")
            if only_for and getattr(self, f.name) != f.default and getattr(self, only_for[0]) not in only_for[1]:
                owner, values = only_for
                raise ConfigError(f"{flag(f.name)} is used by {flag(owner)} {'/'.join(values)} only, and this run "
                                  f"has {flag(owner)} {getattr(self, owner)}; drop it or change {flag(owner)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} must be a table of settings, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)

    def diff(self, other) -> list[str]:
        """'name: mine != theirs' for every field whose value differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class ModelConfig(Settings):
    """Shape of the decoder; any change is another model. head_dim may differ from embed_dim // num_heads."""

    vocab_size: int = setting(32000, "Vocabulary size (taken from the tokenizer).", cli=False, on_resume=REFUSE)
    embed_dim: int = setting(256, "Width of the residual stream.", on_resume=REFUSE)
    num_layers: int = setting(4, "Transformer blocks.", on_resume=REFUSE)
    num_heads: int = setting(8, "Attention heads.", on_resume=REFUSE)
    head_dim: int = setting(32, "Width of each attention head (even: rotary).", on_resume=REFUSE)
    ff_dim: int = setting(768, "Hidden width of the SwiGLU feed-forward.", on_resume=REFUSE)
    max_seq_len: int = setting(128, "Context length, and the length of training windows.", on_resume=REFUSE)
    bias: bool = setting(False, "Biases in the attention and feed-forward projections.", on_resume=REFUSE)
    eps: float = setting(1e-5, "RMSNorm epsilon.", cli=False, on_resume=REFUSE)
    rope_theta: float = setting(10000.0, "Rotary embedding base.", cli=False, on_resume=REFUSE)
    tie_embeddings: bool = setting(True, "Share the embedding matrix with the output head.", on_resume=REFUSE)

    def __post_init__(self):
        self._check_types()
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "ff_dim", "max_seq_len",
                     "eps", "rope_theta"):
            _check_number(name, getattr(self, name), type(getattr(self, name)), positive=True)
        if self.head_dim % 2:
            raise ConfigError(f"--head-dim must be even for rotary embeddings, got {self.head_dim}")
        # A name for this shape that every process spells the same: compiled code finds the model's module
        # skeleton by it (keyed by the object, a saved step would find it by its position in the dict).
        object.__setattr__(self, "key", repr(self))


@dataclass(frozen=True)
class OptimConfig(Settings):
    """The optimizer, its schedule and clipping. Every value here may change on resume except those that
    change the shape of the optimizer state (--optimizer, --amsgrad, SGD momentum turned on or off)."""

    optimizer: str = setting("adamw", "Optimizer.", choices=OPTIMIZERS, on_resume=REFUSE)
    lr: float = setting(3e-3, "Peak learning rate.")
    beta1: float = setting(0.9, "Adam beta1.", only_for=("optimizer", ("adam", "adamw")))
    beta2: float = setting(0.999, "Adam beta2.", only_for=("optimizer", ("adam", "adamw")))
    eps: float = setting(1e-8, "Adam epsilon.", only_for=("optimizer", ("adam", "adamw")))
    weight_decay: float = setting(0.0, "Weight decay (decoupled for adamw, L2 for adam and sgd).")
    amsgrad: bool = setting(False, "AMSGrad variant of Adam.", only_for=("optimizer", ("adam", "adamw")),
                            on_resume=REFUSE)
    momentum: float = setting(0.0, "SGD momentum.", only_for=("optimizer", ("sgd",)))
    dampening: float = setting(0.0, "SGD dampening.", only_for=("optimizer", ("sgd",)))
    nesterov: bool = setting(False, "SGD Nesterov momentum.", only_for=("optimizer", ("sgd",)))
    scheduler: str = setting("cosine", "Learning-rate schedule after the warm-up.", choices=SCHEDULERS)
    step_size: int | None = setting(None, "StepLR period [num-epochs / 3].", unit="epochs",
                                    only_for=("scheduler", ("step",)))
    gamma: float = setting(0.1, "StepLR factor.", only_for=("scheduler", ("step",)))
    t_max: int | None = setting(None, "Cosine period [the whole run].", unit="epochs",
                                only_for=("scheduler", ("cosine",)))
    eta_min: float = setting(0.0, "Cosine floor.", only_for=("scheduler", ("cosine",)))
    start_factor: float = setting(1.0 / 3, "LinearLR start factor.", only_for=("scheduler", ("linear",)))
    end_factor: float = setting(1.0, "LinearLR end factor.", only_for=("scheduler", ("linear",)))
    total_iters: int | None = setting(None, "LinearLR length [the whole run].", unit="epochs",
                                      only_for=("scheduler", ("linear",)))
    warmup_steps: int = setting(0, "Linear warm-up before the schedule.", unit="steps")
    clip_grad: float = setting(1.0, "Clip the global gradient norm to this (0: off).")

    def __post_init__(self):
        self._check_types()
        self._check_only_for()
        _check_number("lr", self.lr, float, positive=True)
        _check_number("eps", self.eps, float, positive=True)
        for name in ("weight_decay", "momentum", "dampening", "eta_min", "clip_grad", "warmup_steps"):
            _check_number(name, getattr(self, name), type(getattr(self, name)), minimum=0)
        for name in ("beta1", "beta2"):
            _check_number(name, getattr(self, name), float, minimum=0, below=1)
        for name in ("gamma", "start_factor", "end_factor"):
            _check_number(name, getattr(self, name), float, positive=True)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("--nesterov needs --momentum > 0 and --dampening 0")
        if self.eta_min > self.lr:
            raise ConfigError(f"--eta-min {self.eta_min} is above --lr {self.lr}: the cosine's floor must be at most "
                              "its peak")

    @property
    def has_momentum_buffer(self) -> bool:
        """SGD keeps a momentum buffer only with momentum > 0: turning it on or off reshapes the state."""
        return self.optimizer == "sgd" and self.momentum > 0


@dataclass(frozen=True)
class DataConfig(Settings):
    """Where the tokens come from and how they are cut into batches (windows are --max-seq-len long)."""

    dataset: str = setting("data/lighthouse.txt", "Plain-text training data (its contents are checked on resume).")
    tokenizer: str = setting("mistral", "SentencePiece model file, or 'mistral'.", aliases=("--processor",),
                             on_resume=REFUSE)
    batch_size: int = setting(8, "Windows per micro-batch.", on_resume=REFUSE)
    batch_stride: int = setting(16, "Tokens between the starts of consecutive windows.", on_resume=REFUSE)
    grad_accum_steps: int = setting(1, "Micro-batches summed into one optimizer step.")
    shuffle: bool = setting(True, "Reshuffle windows every epoch.", on_resume=REFUSE)
    shuffle_seed: int = setting(-1, "Seed of the window order (-1: --seed's). A sweep over --seed keeps one order "
                                "for all its runs and records it here.", on_resume=REFUSE)
    val_fraction: float = setting(0.0, "Hold out this tail of the tokens and evaluate on it every epoch.",
                                  on_resume=REFUSE)

    def __post_init__(self):
        self._check_types()
        for name in ("batch_size", "batch_stride", "grad_accum_steps"):
            _check_number(name, getattr(self, name), int, positive=True)
        _check_number("val_fraction", self.val_fraction, float, minimum=0, below=0.5)
        _check_number("shuffle_seed", self.shuffle_seed, int, minimum=-1)
        if self.shuffle_seed > MAX_SEED:
            raise ConfigError(f"--shuffle-seed must be at most {MAX_SEED} (32 bits), got {self.shuffle_seed}")


@dataclass(frozen=True)
class RunConfig(Settings):
    """The run itself: its checkpoint, length, loss, randomness and where it runs."""

    model: str = setting("checkpoints/mini.pt", "Checkpoint to write, and to resume from if it exists.")
    fresh: bool = setting(False, "Start over even if the checkpoint exists.")
    new_data: bool = setting(False, "Resume the model and optimizer on a changed dataset, from its first batch.")
    init_from: str = setting("", "Start from these weights: a minifn checkpoint or a Hugging Face Llama folder "
                             "(the architecture comes from it; --max-seq-len still sets the windows).",
                             on_resume=REFUSE)
    num_epochs: int = setting(60, "Epochs to train in all (a resumed run continues to this).", aliases=("--epochs",))
    max_steps: int = setting(0, "Stop after this many optimizer steps in all, if sooner (0: no limit).", unit="steps")
    max_tokens: int = setting(0, "Stop after this many training tokens in all, if sooner (0: no limit).",
                              unit="tokens")
    save_every: int = setting(10, "Save every N epochs (0: only at the end).", unit="epochs")
    save_every_steps: int = setting(0, "Also save every N steps (0: off).", unit="steps")
    eval_every: int = setting(0, "Evaluate on the validation split every N steps (0: at every epoch's end).",
                              unit="steps")
    eval_tokens: int = setting(0, "Evaluate on at most this many validation tokens (0: all of them).")
    seed: int = setting(0, "Seed of the initial parameters, the shuffle and dropout.", on_resume=REFUSE)
    criterion: str = setting("cross_entropy", "Loss.", choices=CRITERIA)
    reduction: str = setting("mean", "Average the loss per target token, or sum it.", choices=REDUCTIONS)
    label_smoothing: float = setting(0.0, "Label smoothing (cross_entropy only).",
                                     only_for=("criterion", ("cross_entropy",)))
    dropout: float = setting(0.0, "Dropout on the embedding and every residual branch.")
    ema: float = setting(0.0, "Keep a moving average of the weights with this decay, e.g. 0.999 (0: off). "
                         "Turned on at resume, it starts from the current weights.")
    log_gns: bool = setting(False, "Log the gradient noise scale B_simple (in tokens) from the micro-batches "
                            "(needs --grad-accum-steps 2 or more).")
    device: str = setting("auto", "Device.", choices=DEVICES)
    dtype: str = setting("auto", "bfloat16 runs the forward and backward matmuls under autocast (parameters and "
                         "optimizer stay float32); auto picks it where the hardware multiplies bfloat16 natively "
                         "(CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), float32 elsewhere.",
                         choices=DTYPES)
    compile: str = setting("auto", "torch.compile the step: auto falls back to eager where it cannot.",
                           choices=COMPILE_MODES)

    def __post_init__(self):
        self._check_types()
        self._check_only_for()
        _check_number("num_epochs", self.num_epochs, int, positive=True)
        for name in ("save_every", "max_steps", "max_tokens", "save_every_steps", "eval_every", "eval_tokens"):
            _check_number(name, getattr(self, name), int, minimum=0)
        _check_number("seed", self.seed, int, minimum=0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"--seed must be at most {MAX_SEED} (32 bits), got {self.seed}")
        _check_number("label_smoothing", self.label_smoothing, float, minimum=0, below=1)
        _check_number("dropout", self.dropout, float, minimum=0, below=1)
        _check_number("ema", self.ema, float, minimum=0, below=1)


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    """A whole training run: model, optimizer, data and run settings."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        if not isinstance(d, dict) or set(d) != set(SECTIONS):
            raise ConfigError(f"a run config is a table with exactly the sections {', '.join(SECTIONS)}")
        return cls(**{name: section.from_dict(d[name]) for name, section in SECTIONS.items()})

    @classmethod
    def from_flat(cls, values: dict[str, Any], **model_overrides) -> Config:
        """A Config from one flat {field: value} dict (as the CLI parses it); unknown names are an error."""
        unknown = set(values) - {f.name for f in cli_fields()}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        sections = {}
        for name, section in SECTIONS.items():
            own = {f.name: values[f.name] for f in dataclasses.fields(section) if f.name in values
                   and f.metadata["cli"]}
            sections[name] = section(**own, **(model_overrides if name == "model" else {}))
        return cls(**sections)


def cli_fields() -> list[dataclasses.Field]:
    """Every field that is a command-line flag, in the order the sections list them."""
    return [f for section in SECTIONS.values() for f in dataclasses.fields(section) if f.metadata["cli"]]


def replace(config: Config, **values) -> Config:
    """config with flat settings replaced, whichever section each belongs to."""
    sections = {}
    for name, section in SECTIONS.items():
        own = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(section)}}
        sections[name] = dataclasses.replace(getattr(config, name), **own)
    return Config(**sections)
