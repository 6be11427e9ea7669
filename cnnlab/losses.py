"""Loss functions: cross-entropy and MSE on one-hot targets (for MSE vs CE studies)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlab.checks import check_choice, check_range

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossConfig:
    name: str = "cross_entropy"

    def validate(self, prefix: str = "loss") -> None:
        pass


@dataclass
class CrossEntropyConfig(LossConfig):
    label_smoothing: float = 0.0

    def validate(self, prefix: str = "loss") -> None:
        check_range(f"{prefix}.label_smoothing", self.label_smoothing, 0, 1, high_inclusive=False)


@dataclass
class MSEConfig(LossConfig):
    name: str = "mse"
    softmax: bool = True


LOSSES: dict[str, type[LossConfig]] = {"cross_entropy": CrossEntropyConfig, "mse": MSEConfig}


def loss_schema(name: str) -> type[LossConfig]:
    check_choice("loss.name", name, sorted(LOSSES))
    return LOSSES[name]


def build_loss(cfg: LossConfig, num_classes: int) -> LossFn:
    """A mean-reduced loss of (logits [B, K], integer targets [B])."""
    if isinstance(cfg, CrossEntropyConfig):
        smoothing = cfg.label_smoothing
        return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=smoothing)

    use_softmax = cfg.softmax

    def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Computed in fp32: under bf16 autocast the small squared errors would lose precision.
        out = logits.float().softmax(dim=1) if use_softmax else logits.float()
        return F.mse_loss(out, F.one_hot(y, num_classes).float())

    return mse


def build_member_losses(cfg: LossConfig, num_classes: int) -> LossFn:
    """build_loss for N runs at once (a fused group's members): logits [N, B, K] and targets [N, B] (or [B],
    shared), each run's mean loss [N]: per-sample losses, then one mean per run, so no vmap is needed."""
    if isinstance(cfg, CrossEntropyConfig):
        smoothing = cfg.label_smoothing

        def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            n, b = logits.shape[:2]
            per_sample = F.cross_entropy(logits.float().flatten(0, 1), y.expand(n, b).flatten(),
                                         label_smoothing=smoothing, reduction="none")
            return per_sample.view(n, b).mean(1)
        return cross_entropy

    use_softmax = cfg.softmax

    def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = logits.float().softmax(dim=-1) if use_softmax else logits.float()
        target = F.one_hot(y, num_classes).float().expand_as(out)
        return F.mse_loss(out, target, reduction="none").mean((1, 2))

    return mse


def chance_loss(cfg: LossConfig, num_classes: int) -> float:
    """The loss of a net that outputs the same uniform guess for every image: the stuck level."""
    k = num_classes
    if isinstance(cfg, MSEConfig):
        return (k - 1) / k**2  # per-class variance of a one-hot target around 1/k, averaged
    return math.log(k)  # cross-entropy, label smoothing or not
