"""AlexNet (Krizhevsky et al. 2012): one class, two arch-table rows.

    conv1 [LRN] pool - conv2 [LRN] pool - conv3 - conv4 - conv5 pool - AdaptiveAvgPool(grid)
    - dropout - fc - act - dropout - fc - act - fc

"alexnet_original" is the 224-px ImageNet net as torchvision builds it (11x11 stride-4 conv with
padding 2, overlapping 3/2 max pools, AdaptiveAvgPool2d(6), two 4096-wide hidden layers), with the
paper's ungrouped widths (96, 256, 384, 384, 256; 62,378,344 parameters at 1000 classes) and its
local response normalization. Its stem and unpadded pools need at least 63x63 px. torchvision's
widths (64, 192, 384, 256, 256) with model.lrn=false give exactly torchvision's 61,100,840.

"alexnet" is the same net for 28-64 px images: a 3x3 stride-1 first conv (an 11x11 stride-4 conv
would leave 6 px of a 32-px image), padded 3/2 max pools (ceil(s/2) per axis, so any size >= 1 px
builds) and a 2x2 grid before a 1024-wide classifier: ~4.6M parameters instead of 58M of FC weights.

batch_norm defaults to true for both, although AlexNet has none: with batch_norm=false (the faithful
form: biased convs, no norm) SGD at our default lr 0.05 / momentum 0.9 spikes on Fashion-MNIST after
~15 steps and then stalls or diverges; at the paper's lr 0.01 it is stable but slow (loss 2.3 -> 1.9 in
30 steps on a fixed batch; the BN default is at ~0.2 after 20). BN alone is not enough: its post-ReLU,
max-pooled features have a large common mean, so the first classifier layer (1024 or 9216 inputs) sees a curvature far
above the 2(1 + momentum)/lr that SGD tolerates, and the loss jumps to ~30-1000 at once.
zero_init_last() therefore starts conv5's BN gamma at FC_GAIN / sqrt(classifier inputs) (0.1 for
alexnet), which keeps that first step small for any grid or width.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

from torch import Tensor, nn

from cnnlab.checks import ConfigError, check_range
from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import conv_out, make_activation, make_norm2d

NUM_CONVS = 5  # the five conv layers of the paper; pools follow conv1, conv2 and conv5


@dataclass(frozen=True)
class AlexNetArch:
    convs: tuple[tuple[int, int, int], ...]  # (kernel, stride, padding) of conv1..conv5
    pool: tuple[int, int, int]  # (kernel, stride, padding) of the max pools after conv1, conv2, conv5
    grid: int  # AdaptiveAvgPool2d output side; the classifier sees widths[-1] * grid * grid features


ARCHS: dict[str, AlexNetArch] = {
    "alexnet": AlexNetArch(
        convs=((3, 1, 1), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)), pool=(3, 2, 1), grid=2
    ),
    "alexnet_original": AlexNetArch(
        convs=((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)), pool=(3, 2, 0), grid=6
    ),
}
POOL_AFTER = (0, 1, 4)  # conv indices followed by a max pool
LRN_AFTER = (0, 1)  # the paper normalizes the (rectified) outputs of conv1 and conv2 only
# The paper's LRN: b = a / (k + alpha * sum a^2)^beta over n=5 neighbouring channels, k=2, alpha=1e-4,
# beta=0.75. torch divides alpha by n, so the paper's alpha is passed as 1e-4 * n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
FC_GAIN = 3.2  # start value of conv5's BN gamma * sqrt(classifier inputs); see the module docstring


@dataclass
class AlexNetConfig(ModelConfig):
    widths: List[int] = field(default_factory=lambda: [64, 192, 384, 256, 256])  # channels of conv1..conv5
    classifier_width: int = 1024  # units of the two hidden classifier layers (4096 in the original)
    lrn: bool = False  # local response normalization after conv1 and conv2 (the paper's; no parameters)
    dropout: float = 0.5  # before each hidden classifier layer, as in the paper
    batch_norm: bool = True  # not in the original; false (the paper's form) diverges at lr 0.05

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        positive = all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.widths)
        if len(self.widths) != NUM_CONVS or not positive:
            raise ConfigError(
                f"{prefix}.widths={list(self.widths)!r} is not valid; use {NUM_CONVS} positive ints "
                f"(channels of conv1..conv5), e.g. [64, 192, 384, 256, 256]"
            )
        check_range(f"{prefix}.classifier_width", self.classifier_width, 1)

    def is_standard_form(self) -> bool:
        return list(self.widths) == type(self)().widths  # other widths are another network


@dataclass
class AlexNetOriginalConfig(AlexNetConfig):
    widths: List[int] = field(default_factory=lambda: [96, 256, 384, 384, 256])  # the paper's, ungrouped
    classifier_width: int = 4096
    lrn: bool = True


def feature_size(arch: AlexNetArch, size: int) -> Optional[int]:
    """Side of the last feature map for a `size`-px input, or None if some layer would get < 1 px."""
    for i, (k, s, p) in enumerate(arch.convs):
        size = conv_out(size, k, s, p)
        if size < 1:
            return None
        if i in POOL_AFTER:
            size = conv_out(size, *arch.pool)
            if size < 1:
                return None
    return size


def min_input_size(arch: AlexNetArch) -> int:
    """Smallest side every layer accepts (63 for alexnet_original, 1 for alexnet)."""
    return next(s for s in range(1, 1024) if feature_size(arch, s) is not None)


class AlexNet(nn.Module):
    def __init__(
        self,
        arch: AlexNetArch,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: tuple[int, int] = (224, 224),
        widths: tuple[int, ...] = (96, 256, 384, 384, 256),
        classifier_width: int = 4096,
        lrn: bool = True,
        activation: str = "relu",
        dropout: float = 0.5,
        batch_norm: bool = True,
        name: str = "alexnet_original",
    ) -> None:
        super().__init__()
        if any(feature_size(arch, s) is None for s in input_size):
            m = min_input_size(arch)
            hint = (
                " Use model=alexnet (the small-image form) or resize the images, e.g. "
                "augmentation.ops=[{op: resize, size: 224}, normalize]."
                if name == "alexnet_original"
                else ""
            )
            raise ConfigError(
                f"input size {input_size[0]}x{input_size[1]} is too small for {name}: the minimum is {m}x{m}.{hint}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for i, ((k, s, p), width) in enumerate(zip(arch.convs, widths)):
            layers += [
                nn.Conv2d(channels, width, k, stride=s, padding=p, bias=not batch_norm),  # BN's shift replaces the bias
                make_norm2d(width, batch_norm),
                make_activation(activation),
            ]
            if lrn and i in LRN_AFTER:
                layers.append(nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K))
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(arch.pool[0], arch.pool[1], arch.pool[2]))
            channels = width
        self.features = nn.Sequential(*layers)
        # A fixed grid makes the classifier's input size a constant for every image size.
        self.pool = nn.AdaptiveAvgPool2d(arch.grid)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * arch.grid * arch.grid, classifier_width),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, classifier_width),
            make_activation(activation),
            nn.Linear(classifier_width, num_classes),
        )

    def zero_init_last(self) -> None:
        """Called by init_weights (init=kaiming): shrink conv5's BN gamma; see the module docstring.

        Not to zero: a zero gamma feeds 0 into the ReLU, whose gradient there is 0, so it would never move.
        """
        norms = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        if norms:
            fc1 = self.classifier[2]
            nn.init.constant_(norms[-1].weight, min(1.0, FC_GAIN / fc1.in_features**0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def _alexnet(
    table: str, cfg: AlexNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]
) -> AlexNet:
    return AlexNet(
        ARCHS[table], in_channels, num_classes, input_size, tuple(cfg.widths), cfg.classifier_width, cfg.lrn,
        cfg.activation, cfg.dropout, cfg.batch_norm, name=table,
    )


SCHEMAS: dict[str, type[AlexNetConfig]] = {"alexnet": AlexNetConfig, "alexnet_original": AlexNetOriginalConfig}
# One registered builder per table row: alexnet, alexnet_original.
for _name in ARCHS:
    register(_name, SCHEMAS[_name])(partial(_alexnet, _name))
