"""A user's own model and data, importable by dotted path in tests (model._target_=user_modules.Net)."""
from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Any image size: the pooling makes the classifier's input the same for all."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def data(n: int = 64, channels: int = 1, size: int = 28) -> dict:
    """uint8 N x C x H x W tensors, four classes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return {"train": (images, labels), "test": (images[: n // 2], labels[: n // 2])}
