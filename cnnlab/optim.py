"""Optimizers and learning-rate schedules: schemas, checks and builders.

Every schedule is one LambdaLR stepped once per optimizer step, with the time measured in
(fractional) epochs. Step-style decays therefore land exactly on epoch boundaries, warm-up is
smooth, and resuming only needs the step count.
"""
from __future__ import annotations

import inspect

import math
from dataclasses import asdict, dataclass, field
from typing import Any, List

import torch

from cnnlab.checks import ConfigError, check_choice, check_range


@dataclass
class OptimizerConfig:
    name: str = "???"
    lr: float = 0.01
    weight_decay: float = 0.0

    def validate(self, prefix: str = "optimizer") -> None:
        check_range(f"{prefix}.lr", self.lr, 0, low_inclusive=False)
        check_range(f"{prefix}.weight_decay", self.weight_decay, 0)


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = 0.9
    nesterov: bool = False

    def validate(self, prefix: str = "optimizer") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.momentum", self.momentum, 0, 1, high_inclusive=False)
        if self.nesterov and self.momentum == 0:
            raise ConfigError(f"{prefix}.nesterov=true needs {prefix}.momentum > 0")


@dataclass
class AdamConfig(OptimizerConfig):
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def validate(self, prefix: str = "optimizer") -> None:
        super().validate(prefix)
        if len(self.betas) != 2:
            raise ConfigError(f"{prefix}.betas={list(self.betas)} must be two numbers, e.g. [0.9, 0.999]")
        for i, beta in enumerate(self.betas):
            check_range(f"{prefix}.betas[{i}]", beta, 0, 1, high_inclusive=False)
        check_range(f"{prefix}.eps", self.eps, 0, low_inclusive=False)


@dataclass
class RMSpropConfig(OptimizerConfig):
    lr: float = 1e-3
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0

    def validate(self, prefix: str = "optimizer") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.alpha", self.alpha, 0, 1, high_inclusive=False)
        check_range(f"{prefix}.eps", self.eps, 0, low_inclusive=False)
        check_range(f"{prefix}.momentum", self.momentum, 0, 1, high_inclusive=False)


OPTIMIZERS: dict[str, tuple[type[OptimizerConfig], type[torch.optim.Optimizer]]] = {
    "sgd": (SGDConfig, torch.optim.SGD),
    "adam": (AdamConfig, torch.optim.Adam),
    "adamw": (AdamConfig, torch.optim.AdamW),
    "radam": (AdamConfig, torch.optim.RAdam),
    "rmsprop": (RMSpropConfig, torch.optim.RMSprop),
}


def optimizer_schema(name: str) -> type[OptimizerConfig]:
    check_choice("optimizer.name", name, sorted(OPTIMIZERS))
    return OPTIMIZERS[name][0]


def build_optimizer(cfg: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
    params = list(params)
    kwargs = asdict(cfg)
    del kwargs["name"]
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    optimizer_class = OPTIMIZERS[cfg.name][1]
    # On CUDA a small model's step is launch-bound; the fused kernels update every parameter at once.
    if params and all(p.is_cuda for p in params) and "fused" in inspect.signature(optimizer_class).parameters:
        kwargs["fused"] = True
    return optimizer_class(params, **kwargs)


# ---------------------------------------------------------------------------------------------
# Schedules


@dataclass
class SchedulerConfig:
    name: str = "none"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1

    def validate(self, prefix: str = "scheduler") -> None:
        check_range(f"{prefix}.warmup_epochs", self.warmup_epochs, 0)
        check_range(f"{prefix}.warmup_start_factor", self.warmup_start_factor, 0, 1, low_inclusive=False)

    def factor(self, t: float, total: float) -> float:
        """The schedule's lr multiplier at time t (epochs) of a total-epoch run, before warm-up."""
        return 1.0


@dataclass
class StepConfig(SchedulerConfig):
    step_size: int = 10
    gamma: float = 0.1

    def validate(self, prefix: str = "scheduler") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.step_size", self.step_size, 1)
        check_range(f"{prefix}.gamma", self.gamma, 0, 1, low_inclusive=False)

    def factor(self, t: float, total: float) -> float:
        return self.gamma ** math.floor(t / self.step_size)


@dataclass
class MultiStepConfig(SchedulerConfig):
    milestones: List[int] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1

    def validate(self, prefix: str = "scheduler") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.gamma", self.gamma, 0, 1, low_inclusive=False)
        ms = list(self.milestones)
        if not ms or any(m < 1 for m in ms) or ms != sorted(set(ms)):
            raise ConfigError(f"{prefix}.milestones={ms} must be a non-empty, strictly increasing list of epochs >= 1")

    def factor(self, t: float, total: float) -> float:
        return self.gamma ** sum(t >= m for m in self.milestones)


@dataclass
class CosineConfig(SchedulerConfig):
    min_lr_factor: float = 0.0

    def validate(self, prefix: str = "scheduler") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.min_lr_factor", self.min_lr_factor, 0, 1, high_inclusive=False)

    def factor(self, t: float, total: float) -> float:
        # The cosine starts after the warm-up so the peak lr is actually reached.
        span = max(total - self.warmup_epochs, 1e-12)
        progress = min(max(t - self.warmup_epochs, 0.0) / span, 1.0)
        return self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class ExponentialConfig(SchedulerConfig):
    gamma: float = 0.95

    def validate(self, prefix: str = "scheduler") -> None:
        super().validate(prefix)
        check_range(f"{prefix}.gamma", self.gamma, 0, 1, low_inclusive=False)

    def factor(self, t: float, total: float) -> float:
        return self.gamma ** math.floor(t)


@dataclass
class OneCycleConfig(SchedulerConfig):
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def validate(self, prefix: str = "scheduler") -> None:
        super().validate(prefix)
        if self.warmup_epochs:
            raise ConfigError(f"{prefix}.warmup_epochs must be 0 for onecycle: its ramp-up phase is the warm-up")
        check_range(f"{prefix}.pct_start", self.pct_start, 0, 1, low_inclusive=False, high_inclusive=False)
        check_range(f"{prefix}.div_factor", self.div_factor, 1)
        check_range(f"{prefix}.final_div_factor", self.final_div_factor, 1)

    def factor(self, t: float, total: float) -> float:
        def cos_between(start: float, end: float, p: float) -> float:
            return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))

        start, low = 1 / self.div_factor, 1 / (self.div_factor * self.final_div_factor)
        peak = self.pct_start * total
        if t < peak:
            return cos_between(start, 1.0, t / peak)
        return cos_between(1.0, low, (t - peak) / max(total - peak, 1e-12))


SCHEDULERS: dict[str, type[SchedulerConfig]] = {
    "none": SchedulerConfig,
    "step": StepConfig,
    "multistep": MultiStepConfig,
    "cosine": CosineConfig,
    "exponential": ExponentialConfig,
    "onecycle": OneCycleConfig,
}


def scheduler_schema(name: str) -> type[SchedulerConfig]:
    check_choice("scheduler.name", name, sorted(SCHEDULERS))
    return SCHEDULERS[name]


class LrSchedule:
    """lr multiplier as a function of the optimizer step: warm-up times the schedule's factor."""

    def __init__(self, cfg: SchedulerConfig, steps_per_epoch: int, epochs: int) -> None:
        self.cfg, self.steps_per_epoch, self.epochs = cfg, steps_per_epoch, epochs

    def __call__(self, step: int) -> float:
        t = step / self.steps_per_epoch
        warm = 1.0
        if self.cfg.warmup_epochs and t < self.cfg.warmup_epochs:
            s = self.cfg.warmup_start_factor
            warm = s + (1 - s) * t / self.cfg.warmup_epochs
        return warm * self.cfg.factor(t, self.epochs)


def build_scheduler(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(cfg, steps_per_epoch, epochs))
