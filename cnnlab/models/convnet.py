"""ConvNet5: the plain five-conv network of a common homework.

Per layer: 3x3 conv with "same" padding [+ BN] -> act -> 2x2 average pool with stride 1. The stride-1
pool smooths without downsampling, so each layer shrinks the map by exactly 1 px per axis (32 -> 27
after five layers) and the flattened features feed one Linear layer (128 * 27 * 27 -> classes at
32 px). Its size is computed here, at build time. The smallest input is len(widths) + 1 px per side.

batch_norm defaults to true although the homework net has none: with batch_norm=false (the faithful
original: biased convs, no norm) SGD at our default lr 0.05 / momentum 0.9 diverges on Fashion-MNIST
within ~10-30 steps for every init we tried; it trains at lr 0.01 (or with a warm-up). With BN the
convs are scale invariant, and only the 67k-93k-input head can still blow up: the mean feature vector
x_mean gives its loss a curvature of ~0.1 * |x_mean|^2 ~ 1000 at init, far above the 2(1 + momentum)/lr
= 76 that SGD tolerates (the loss first jumps to ~100). zero_init_last() therefore starts the last BN's gamma at
HEAD_GAIN / sqrt(head inputs), which makes that curvature ~10 for every image size.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, List

from torch import Tensor, nn

from cnnlab.checks import ConfigError
from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d

ARCHS: dict[str, tuple[int, ...]] = {
    "convnet5": (32, 32, 64, 64, 128),  # channels of each conv layer
}
# Start value of gamma * sqrt(head inputs) for the last BN: post-ReLU features then have mean ~0.4 * gamma,
# so |x_mean|^2 ~ 0.16 * HEAD_GAIN^2 = 100 whatever the image size.
HEAD_GAIN = 25.0


def check_widths(widths: Any, key: str) -> tuple[int, ...]:
    """A non-empty list of positive ints, else ConfigError."""
    ok = isinstance(widths, Sequence) and not isinstance(widths, str) and len(widths) > 0
    if not (ok and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
        raise ConfigError(f"{key}={widths!r} is not valid; use a non-empty list of positive ints, e.g. [32, 64]")
    return tuple(int(w) for w in widths)


@dataclass
class ConvNetConfig(ModelConfig):
    widths: List[int] = field(default_factory=lambda: list(ARCHS["convnet5"]))  # channels per conv; any length >= 1
    dropout: float = 0.0  # before the final linear layer
    batch_norm: bool = True  # not in the homework net, whose plain form diverges at lr 0.05 (see above)

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check_widths(list(self.widths), f"{prefix}.widths")


class ConvNet(nn.Module):
    def __init__(
        self,
        widths: Sequence[int] = ARCHS["convnet5"],
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: tuple[int, int] = (32, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = True,
        name: str = "convnet5",
    ) -> None:
        super().__init__()
        widths = check_widths(list(widths), "model.widths")
        h, w = (s - len(widths) for s in input_size)  # each stride-1 2x2 pool drops one px per axis
        if min(h, w) < 1:
            m = len(widths) + 1
            raise ConfigError(
                f"input size {input_size[0]}x{input_size[1]} is too small for {name} with "
                f"{len(widths)} layers: the minimum is {m}x{m}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm),  # BN's shift replaces the bias
                make_norm2d(width, batch_norm),
                make_activation(activation),
                nn.AvgPool2d(2, stride=1),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * h * w, num_classes),
        )

    def zero_init_last(self) -> None:
        """Called by init_weights (init=kaiming): shrink the last BN's gamma; see the module docstring.

        Not to zero: a zero gamma feeds 0 into the ReLU, whose gradient there is 0, so it would never move.
        """
        norms = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        if norms:
            head = self.classifier[-1]
            nn.init.constant_(norms[-1].weight, min(1.0, HEAD_GAIN / head.in_features**0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _convnet(
    table: str, cfg: ConvNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]
) -> ConvNet:
    # cfg.widths defaults to the table row; a user's list replaces it.
    return ConvNet(cfg.widths, in_channels, num_classes, input_size, cfg.activation, cfg.dropout, cfg.batch_norm, table)


for _name in ARCHS:
    register(_name, ConvNetConfig)(partial(_convnet, _name))
