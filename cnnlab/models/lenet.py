"""LeNet-5 (LeCun et al. 1998) adapted to any channel count and image size.

conv(6, k, "same") -> act -> pool 2 -> conv(16, k, valid) -> act -> pool 2 -> 120 -> 84 -> classes.
The first conv pads by k//2 so a 28-px Fashion-MNIST image plays the role of the paper's padded
32-px input. The smallest input is 2*(k+1) px per side (12 for k=5, 8 for k=3): the second pool
needs at least 2 px left after the unpadded second conv.
"""
from dataclasses import dataclass

from torch import Tensor, nn

from cnnlab.checks import ConfigError, check_choice
from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import conv_out, make_activation, make_norm1d, make_norm2d

KERNEL_SIZES = (5, 3)
POOLS = ("max", "avg")


@dataclass
class LeNetConfig(ModelConfig):
    kernel_size: int = 5  # 5|3: size of both conv kernels
    pool: str = "max"  # max|avg (the 1998 paper used average pooling)
    batch_norm: bool = False  # not in the original
    dropout: float = 0.0

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.kernel_size", self.kernel_size, KERNEL_SIZES)
        check_choice(f"{prefix}.pool", self.pool, POOLS)


def min_input_size(kernel_size: int) -> int:
    return 2 * (kernel_size + 1)


class LeNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: tuple[int, int] = (28, 28),
        kernel_size: int = 5,
        pool: str = "max",
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        k = kernel_size
        # Per axis: "same" conv, pool 2, valid conv, pool 2 (floor, as torch does).
        out_hw = [conv_out(conv_out(conv_out(s, 2, 2), k), 2, 2) for s in input_size]
        if min(out_hw) < 1:
            m = min_input_size(k)
            raise ConfigError(
                f"input size {input_size[0]}x{input_size[1]} is too small for lenet with "
                f"model.kernel_size={k}: the minimum is {m}x{m}"
            )
        pool_cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        bias = not batch_norm  # a norm right after a layer cancels its bias
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, k, padding=k // 2, bias=bias),
            make_norm2d(6, batch_norm),
            make_activation(activation),
            pool_cls(2),
            nn.Conv2d(6, 16, k, bias=bias),
            make_norm2d(16, batch_norm),
            make_activation(activation),
            pool_cls(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * out_hw[0] * out_hw[1], 120, bias=bias),
            make_norm1d(120, batch_norm),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(120, 84, bias=bias),
            make_norm1d(84, batch_norm),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register("lenet", LeNetConfig)
def lenet(cfg: LeNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> LeNet:
    return LeNet(
        in_channels, num_classes, input_size, cfg.kernel_size, cfg.pool, cfg.activation, cfg.dropout, cfg.batch_norm
    )
