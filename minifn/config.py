"""Frozen, validated settings: the model's shape and the training run's knobs.

Both are plain dataclasses so they hash (the model skeleton is cached per config), compare field by
field (a checkpoint names the fields that differ), and round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "linear")
CRITERIA = ("cross_entropy", "mse", "mae")
REDUCTIONS = ("mean", "sum")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and why."""


def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be zero or positive, got {value!r}")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


class _Dict:
    """JSON round-trip shared by both configs; unknown keys are an error, not ignored."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**d)

    def diff(self, other) -> list[str]:
        """Names of the fields whose values differ, as 'name: mine != theirs'."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class ModelConfig(_Dict):
    """Shape of the decoder. head_dim may differ from embed_dim // num_heads (attention projects)."""

    vocab_size: int = 32000
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    head_dim: int = 32
    ff_dim: int = 768
    max_seq_len: int = 128
    bias: bool = False
    eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "ff_dim", "max_seq_len"):
            _positive(name, getattr(self, name))
        _positive("eps", self.eps, float)
        _positive("rope_theta", self.rope_theta, float)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


@dataclass(frozen=True)
class TrainConfig(_Dict):
    """Everything about a run that is not the model's shape. Lengths are in optimizer steps."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    scheduler: str = "none"
    step_size: int = 1
    gamma: float = 0.1
    t_max: int = 1
    eta_min: float = 0.0
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5
    warmup_steps: int = 0
    criterion: str = "cross_entropy"
    reduction: str = "mean"
    label_smoothing: float = 0.0
    dropout: float = 0.0
    clip_grad: float = 0.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        _one_of("criterion", self.criterion, CRITERIA)
        _one_of("reduction", self.reduction, REDUCTIONS)
        _positive("lr", self.lr, float)
        _positive("eps", self.eps, float)
        for name in ("step_size", "t_max", "total_iters", "grad_accum_steps"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "momentum", "dampening", "eta_min", "clip_grad", "warmup_steps"):
            _non_negative(name, getattr(self, name))
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.label_smoothing and self.criterion != "cross_entropy":
            raise ConfigError("label_smoothing applies to the cross_entropy criterion only")
        _positive("gamma", self.gamma, float)
        _positive("start_factor", self.start_factor, float)
        _positive("end_factor", self.end_factor, float)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov needs momentum > 0 and dampening = 0")
