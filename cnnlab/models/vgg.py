"""VGG (Simonyan & Zisserman 2014) for small images: one class, depth from an arch table.

An arch is a sequence of stages (num_convs, channels); each stage is num_convs x (3x3 conv, pad 1
[+ BN] + act) then a 2x2 max pool. A pool is skipped along an axis already < 2 px, so 28-px inputs
work with five stages (28 -> 14 -> 7 -> 3 -> 1, last pool skipped) and any input of at least
1x1 builds. AdaptiveAvgPool2d(pool_size) then makes the classifier input last_channels * pool_size^2
for every image size. pool_size=1 is our default; 7 is torchvision's (the original's 224-px ImageNet
head): with pool_size=7, classifier_width=4096 and batch_norm=false, vgg11/vgg16 have exactly
torchvision's parameter counts. At 32 px a 7x7 pool would mostly repeat the 1x1 feature map 49 times.

vgg_tiny is ours, for quick CPU runs and smoke tests: three stages 16/32/64 (four convs), about 0.36M
parameters at the default classifier_width (most of them in the classifier), ~5M multiply-adds per
32-px image, roughly 60x fewer than vgg11.
"""
from collections.abc import Sequence
from functools import partial
from dataclasses import dataclass
from typing import Any, List, Optional

from torch import Tensor, nn

from cnnlab.checks import ConfigError, check_range
from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d

Arch = tuple[tuple[int, int], ...]  # ((num_convs, channels), ...)

ARCHS: dict[str, Arch] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
    "vgg_tiny": ((1, 16), (1, 32), (2, 64)),  # not from the paper: a fast VGG for CPU runs and tests
}


def normalize_arch(arch: Any, key: str = "model.arch") -> Arch:
    """Accept [[n, c], ...], ((n, c), ...) (d2l's conv_arch) or an OmegaConf list; ConfigError otherwise."""

    def is_pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def is_seq(v: Any) -> bool:
        return isinstance(v, Sequence) and not isinstance(v, (str, bytes))

    if is_seq(arch) and len(arch) > 0 and all(is_seq(p) and len(p) == 2 and all(map(is_pos_int, p)) for p in arch):
        return tuple((int(n), int(c)) for n, c in arch)
    raise ConfigError(
        f"{key}={arch!r} is not valid; use null (the table of model.name) or a non-empty list of "
        f"[num_convs, channels] pairs of positive ints, e.g. [[1, 64], [1, 128], [2, 256]]"
    )


@dataclass
class VGGConfig(ModelConfig):
    arch: Optional[List[Any]] = None  # [[num_convs, channels], ...]; None uses the table of `name`
    classifier_width: int = 512  # units of the two hidden classifier layers (4096 in the original)
    pool_size: int = 1  # AdaptiveAvgPool2d output side before the classifier (7 in torchvision/the original)
    dropout: float = 0.5
    batch_norm: bool = True  # without BN a from-scratch VGG often stalls at loss ln(classes)

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        if self.arch is not None:
            normalize_arch(self.arch, f"{prefix}.arch")
        check_range(f"{prefix}.classifier_width", self.classifier_width, 1)
        check_range(f"{prefix}.pool_size", self.pool_size, 1)

    def is_standard_form(self) -> bool:
        return self.arch is None  # model.arch=[[1,64],...] is no longer VGG-11/16/...


def conv_stages(
    arch: Sequence[tuple[int, int]], in_channels: int, input_size: tuple[int, int], activation: str, batch_norm: bool
) -> tuple[nn.Sequential, int]:
    """VGG-style stages: per (num_convs, channels), that many 3x3 conv [+BN] + act, then a 2x2 max
    pool on the axes that still have >= 2 px. Returns the stages and their output channels."""
    h, w = input_size
    stages = []
    channels = in_channels
    for num_convs, out_channels in arch:
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            # No conv bias under BN: the norm's shift replaces it.
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=not batch_norm),
                make_norm2d(out_channels, batch_norm),
                make_activation(activation),
            ]
            channels = out_channels
        kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
        if kh * kw > 1:  # pool only the axes that still have >= 2 px
            layers.append(nn.MaxPool2d((kh, kw)))
            h, w = h // kh, w // kw
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), channels


class VGG(nn.Module):
    def __init__(
        self,
        arch: Sequence[Sequence[int]],
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: tuple[int, int] = (32, 32),
        activation: str = "relu",
        dropout: float = 0.5,
        batch_norm: bool = True,
        classifier_width: int = 512,
        pool_size: int = 1,
    ) -> None:
        super().__init__()
        arch = normalize_arch(arch)
        self.features, channels = conv_stages(arch, in_channels, input_size, activation, batch_norm)
        # A fixed output size, so the first Linear's in_features is known here for every input size.
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * pool_size * pool_size, classifier_width),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, classifier_width),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def _vgg(table: str, cfg: VGGConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> VGG:
    arch = cfg.arch if cfg.arch is not None else ARCHS[table]  # a custom arch replaces the table
    return VGG(
        arch,
        in_channels,
        num_classes,
        input_size,
        cfg.activation,
        cfg.dropout,
        cfg.batch_norm,
        cfg.classifier_width,
        cfg.pool_size,
    )


# One registered builder per table row: vgg11, vgg13, vgg16, vgg19, vgg_tiny.
for _name in ARCHS:
    register(_name, VGGConfig)(partial(_vgg, _name))
