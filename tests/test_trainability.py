"""Every model trains out of the box: with its shipped defaults (conf/model/*.yaml) and the
default optimizer (SGD, momentum 0.9, at the default lr per example: lr 0.05 is for batch 64, so
a 16-image batch gets 0.0125), the training loss falls clearly within a few dozen steps on a
small batch of real Fashion-MNIST images. This is the failure our users lost days to:
VGG-11 and GoogLeNet sitting at loss ln(10) = 2.3026 with every image put in one class."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cnnlab.checks import ConfigError
from cnnlab.config import model_defaults, validate
from cnnlab.data.sources import read_idx
from cnnlab.models import build_model, zoo
from cnnlab.optim import build_optimizer

from conftest import FASHION_MNIST_SYSTEM_DIR, compose_config

BATCH, STEPS = 16, 20  # a few dozen steps on a small batch; sized to keep the suite fast on 2 cores
SIZES = (28, 64, 128, 224)  # the first that a model builds for (alexnet_original needs >= 63 px)


@pytest.fixture(scope="module")
def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz", "images")
    labels = read_idx(FASHION_MNIST_SYSTEM_DIR / "train-labels-idx1-ubyte.gz", "labels")
    x = torch.from_numpy(images[:BATCH].copy()).float().div(255).sub(0.2860).div(0.3530)
    return x, torch.from_numpy(labels[:BATCH].astype("int64"))


def build_for_smallest_size(name: str) -> tuple[torch.nn.Module, int]:
    for size in SIZES:
        try:
            return build_model(model_defaults(name), 1, 10, (size, size)), size
        except ConfigError:
            continue
    raise AssertionError(f"{name} builds for none of {SIZES}")


@pytest.mark.parametrize("name", zoo())
def test_model_trains_with_its_defaults(name, real_batch):
    torch.manual_seed(0)
    model, size = build_for_smallest_size(name)
    x, y = real_batch
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    defaults = validate(compose_config())  # the optimizer and schedule a plain run gets
    # Same lr per example as the default run: the linear scaling rule for our smaller batch.
    sgd = dataclasses.replace(defaults.optimizer, lr=defaults.optimizer.lr * BATCH / defaults.trainer.batch_size)
    optimizer = build_optimizer(sgd, model.parameters())
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    start, end = losses[0], sum(losses[-3:]) / 3
    assert start == pytest.approx(2.3026, abs=0.35), f"{name}: first loss {start:.3f} is not ~ln(10)"
    # A stuck net stays within ~0.01 of ln(10); "clearly lower" is a drop no stuck run makes.
    assert end < 0.8 * start and end < start - 0.4, f"{name} did not train: loss {start:.3f} -> {end:.3f} ({losses})"
