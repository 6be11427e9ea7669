"""A student-style network, trained by cnnlab as it is written: this file does not import cnnlab.

From this folder (or with it on PYTHONPATH):

    cnnlab model=custom model._target_=tinyvgg.TinyVGG +model.width=32 dataset=cifar10
    cnnlab models model=custom model._target_=tinyvgg.TinyVGG --dataset cifar10        # its model card
    cnnlab -m model=custom model._target_=tinyvgg.TinyVGG model.activation=relu,swish optimizer.lr=0.05,0.01

cnnlab passes `in_channels`, `num_classes` and `image_size` from the dataset (because the constructor
has parameters of those names), `width` from `+model.width=...`, and `activation`, `dropout` and
`batch_norm` from the common keys `model.activation=...` and so on.
"""
from __future__ import annotations

import torch
from torch import nn


class Swish(nn.Module):
    """x * sigmoid(x), written out as homework asks (torch has it as nn.SiLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


ACTIVATIONS = {"relu": nn.ReLU, "swish": Swish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def conv_block(cin: int, cout: int, activation: str, batch_norm: bool) -> nn.Sequential:
    """conv-act-conv-act-pool: two 3x3 convolutions, then the image shrinks by half."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class TinyVGG(nn.Module):
    """Two VGG blocks and a linear classifier (the CNN Explainer network)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 16,
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.features = nn.Sequential(conv_block(in_channels, width, activation, batch_norm),
                                      conv_block(width, width, activation, batch_norm))
        side = image_size // 4  # two 2x2 poolings
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
