"""Learning-rate schedules as pure functions `(step, base_lr) -> lr` of 0-D tensors, computed in
base_lr's dtype (float64 in optimizer states).

The shapes are torch.optim.lr_scheduler's (StepLR, CosineAnnealingLR, LinearLR) in closed form,
so a compiled step evaluates them from the step counter without retracing.
"""

from __future__ import annotations

import math

import torch

from minifn.optim import Schedule


def constant() -> Schedule:
    return lambda step, lr: lr


def step_decay(step_size: int, gamma: float = 0.1) -> Schedule:
    """lr * gamma ** (step // step_size)."""
    if step_size < 1:
        raise ValueError(f"step_size must be at least 1, got {step_size}")
    return lambda step, lr: lr * gamma ** torch.div(step, step_size, rounding_mode="floor").to(lr.dtype)


def cosine(t_max: int, eta_min: float = 0.0) -> Schedule:
    """eta_min + (lr - eta_min) * (1 + cos(pi * step / t_max)) / 2, periodic past t_max as in torch.

    Written as sin^2(pi * (t_max - step) / (2 t_max)) so it keeps full precision near eta_min."""
    if t_max < 1:
        raise ValueError(f"t_max must be at least 1, got {t_max}")

    def schedule(step, lr):
        return eta_min + (lr - eta_min) * torch.sin(math.pi * (t_max - step.to(lr.dtype)) / (2 * t_max)) ** 2

    return schedule


def linear(start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Schedule:
    """lr * factor, the factor moving linearly from start_factor to end_factor over total_iters steps."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be at least 1, got {total_iters}")

    def schedule(step, lr):
        progress = step.clamp(max=total_iters).to(lr.dtype) / total_iters
        return lr * (start_factor + (end_factor - start_factor) * progress)

    return schedule


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Ramp linearly from lr / warmup_steps to lr over the first warmup_steps, then run schedule from 0."""
    if warmup_steps <= 0:
        return schedule

    def warmed(step, lr):
        ramp = lr * (step + 1).to(lr.dtype) / warmup_steps
        return torch.where(step < warmup_steps, ramp, schedule((step - warmup_steps).clamp(min=0), lr))

    return warmed


def make(name: str, *, step_size=1, gamma=0.1, t_max=1, eta_min=0.0, start_factor=1.0 / 3,
         end_factor=1.0, total_iters=5, warmup_steps=0) -> Schedule:
    """A schedule by its CLI name: none, step, cosine or linear, optionally after a linear warm-up."""
    schedules = {
        "none": constant,
        "step": lambda: step_decay(step_size, gamma),
        "cosine": lambda: cosine(t_max, eta_min),
        "linear": lambda: linear(start_factor, end_factor, total_iters),
    }
    if name not in schedules:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(schedules)}")
    return warmup(schedules[name](), warmup_steps)
