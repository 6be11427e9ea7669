"""CifarNet: a plain conv-BN-act stack, the usual strong baseline for 32-px images.

Per stage of widths[i] channels: (3x3 conv [+ BN] -> act) x 2, then a 2x2 max pool, skipped along
an axis already < 2 px (so 28 px works with four stages: 28 -> 14 -> 7 -> 3 -> 1 and any input of
at least 1x1 builds). Then global average pooling, dropout and one Linear layer.

zero_init_last() starts the last BN's gamma at HEAD_GAIN / sqrt(head inputs) (0.14 for 512): the
head's input is post-ReLU, max-pooled, so it has a large common mean, and at gamma 1 the head's
curvature is near the 2(1 + momentum)/lr that SGD at lr 0.05 tolerates (the loss first jumps to ~4).
"""
from dataclasses import dataclass, field
from functools import partial
from typing import List, Sequence

from torch import Tensor, nn

from cnnlab.models import ModelConfig, register
from cnnlab.models.convnet import check_widths
from cnnlab.models.vgg import conv_stages

CONVS_PER_STAGE = 2
HEAD_GAIN = 3.2  # start value of the last BN's gamma * sqrt(head inputs); see the module docstring

ARCHS: dict[str, tuple[int, ...]] = {
    "cifarnet": (64, 128, 256, 512),  # channels of each stage
}


@dataclass
class CifarNetConfig(ModelConfig):
    widths: List[int] = field(default_factory=lambda: list(ARCHS["cifarnet"]))  # channels per stage; any length >= 1
    dropout: float = 0.0  # before the final linear layer
    batch_norm: bool = True  # a plain stack this deep trains far faster with BN

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check_widths(list(self.widths), f"{prefix}.widths")


class CifarNet(nn.Module):
    def __init__(
        self,
        widths: Sequence[int] = ARCHS["cifarnet"],
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: tuple[int, int] = (32, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        widths = check_widths(list(widths), "model.widths")
        # The VGG stage builder with CONVS_PER_STAGE convs per width.
        self.features, channels = conv_stages(
            [(CONVS_PER_STAGE, width) for width in widths], in_channels, input_size, activation, batch_norm
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def zero_init_last(self) -> None:
        """Called by init_weights (init=kaiming): shrink the last BN's gamma; see the module docstring.

        Not to zero: a zero gamma feeds 0 into the ReLU, whose gradient there is 0, so it would never move.
        """
        norms = [m for m in self.features.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            head = self.classifier[-1]
            nn.init.constant_(norms[-1].weight, min(1.0, HEAD_GAIN / head.in_features**0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def _cifarnet(
    table: str, cfg: CifarNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]
) -> CifarNet:
    return CifarNet(cfg.widths, in_channels, num_classes, input_size, cfg.activation, cfg.dropout, cfg.batch_norm)


for _name in ARCHS:
    register(_name, CifarNetConfig)(partial(_cifarnet, _name))
