"""Learning-rate schedules, optimizers and losses: the numbers, not just that they build."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cnnlab.config import typed_group
from cnnlab.losses import build_loss
from cnnlab.optim import OPTIMIZERS, build_optimizer, build_scheduler

STEPS_PER_EPOCH = 10


def lrs(scheduler_node: dict, epochs: int, lr: float = 0.1) -> list[float]:
    """lr used at every optimizer step of a run, as the trainer steps the scheduler."""
    cfg = typed_group("scheduler", scheduler_node)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(cfg, optimizer, STEPS_PER_EPOCH, epochs)
    out = []
    for _ in range(epochs * STEPS_PER_EPOCH):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def at_epoch(values: list[float], epoch: int) -> float:
    """lr at the first step of a 0-based epoch."""
    return values[epoch * STEPS_PER_EPOCH]


def test_step_decays_by_gamma_every_step_size_epochs():
    values = lrs({"name": "step", "step_size": 10, "gamma": 0.1}, epochs=25)
    assert at_epoch(values, 9) == pytest.approx(0.1)
    assert at_epoch(values, 10) == pytest.approx(0.01)
    assert at_epoch(values, 20) == pytest.approx(0.001)
    assert values[10 * STEPS_PER_EPOCH - 1] == pytest.approx(0.1)  # still the old lr in the last step of epoch 10


def test_multistep_and_exponential():
    values = lrs({"name": "multistep", "milestones": [2, 5], "gamma": 0.5}, epochs=6)
    assert [at_epoch(values, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    values = lrs({"name": "exponential", "gamma": 0.9}, epochs=4)
    assert [at_epoch(values, e) for e in range(4)] == pytest.approx([0.1 * 0.9**e for e in range(4)])


def test_linear_warmup_then_cosine_to_the_floor():
    values = lrs({"name": "cosine", "warmup_epochs": 2, "warmup_start_factor": 0.1, "min_lr_factor": 0.1}, epochs=10)
    assert values[0] == pytest.approx(0.01)  # starts at lr * warmup_start_factor
    assert at_epoch(values, 1) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # halfway through the warm-up
    assert at_epoch(values, 2) == pytest.approx(0.1)  # peak right after the warm-up
    assert all(b <= a + 1e-12 for a, b in zip(values[20:], values[21:]))  # then only down
    assert values[-1] == pytest.approx(0.01, rel=0.02)  # lr * min_lr_factor at the end
    assert min(values[20:]) >= 0.01 - 1e-12


def test_onecycle_ramps_up_to_lr_then_anneals():
    values = lrs({"name": "onecycle", "pct_start": 0.3, "div_factor": 25, "final_div_factor": 1e4}, epochs=10)
    assert values[0] == pytest.approx(0.1 / 25)
    peak = values.index(max(values))
    assert peak == 30 and max(values) == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(values[30:], values[31:]))  # then only down
    assert values[-1] < values[0] / 50  # far below the starting lr by the last step (t = 9.9 of 10 epochs)


def test_constant_schedule_with_warmup():
    values = lrs({"name": "none", "warmup_epochs": 1, "warmup_start_factor": 0.5}, epochs=3)
    assert values[0] == pytest.approx(0.05)
    assert values[5] == pytest.approx(0.075)
    assert set(values[10:]) == {0.1}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_takes_its_config(name):
    cfg = typed_group("optimizer", {"name": name, "lr": 0.123, "weight_decay": 0.001})
    optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, OPTIMIZERS[name][1])
    assert optimizer.param_groups[0]["lr"] == 0.123 and optimizer.param_groups[0]["weight_decay"] == 0.001


def test_losses_match_their_definitions():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 1])
    ce = build_loss(typed_group("loss", {"name": "cross_entropy", "label_smoothing": 0.1}), 3)
    assert ce(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.1).item())
    one_hot = F.one_hot(targets, 3).float()
    mse = build_loss(typed_group("loss", {"name": "mse", "softmax": True}), 3)
    assert mse(logits, targets).item() == pytest.approx(((logits.softmax(1) - one_hot) ** 2).mean().item())
    raw = build_loss(typed_group("loss", {"name": "mse", "softmax": False}), 3)
    assert raw(logits, targets).item() == pytest.approx(((logits - one_hot) ** 2).mean().item())
    assert math.isfinite(mse(logits.bfloat16(), targets).item())
