"""LeNet-5 (LeCun et al. 1998) adapted to any channel count and image size.

conv(6, k) -> act -> pool 2 -> conv(16, k, valid) -> act -> pool 2 -> 120 -> 84 -> classes.
The first conv's padding (model.padding) is the paper's by default ("auto"): none on a 32-px image,
whose 5x5 conv gives 28x28x6 as in the paper (62,006 parameters on 3x32x32), and k//2 ("same") below
32 px, so a 28-px Fashion-MNIST image plays the role of the paper's 32-px input (61,706 on 1x28x28,
the paper's own count). "same", "valid" or a number of pixels choose otherwise. The smallest input
is the one that leaves the second pool at least 2 px (12 for k=5 with "auto").
"""
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cnnlab.checks import ConfigError, check_choice, is_whole
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
    padding: Any = "auto"  # auto|same|valid|<pixels>: the first conv's padding (auto: the paper's)

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.kernel_size", self.kernel_size, KERNEL_SIZES)
        check_choice(f"{prefix}.pool", self.pool, POOLS)
        if self.padding not in PADDINGS and not (is_whole(self.padding) and self.padding >= 0):
            raise ConfigError(f"{prefix}.padding={self.padding!r} is not valid; choose one of: {', '.join(PADDINGS)} "
                              f"or a whole number of pixels >= 0")


PADDINGS = ("auto", "same", "valid")


def first_padding(padding: Any, kernel_size: int, input_size: tuple[int, int]) -> int:
    """Pixels of padding of the first conv: auto is none from 32 px up (the paper), "same" below."""
    if padding == "auto":
        return 0 if min(input_size) >= 32 else kernel_size // 2
    return {"same": kernel_size // 2, "valid": 0}.get(padding, padding)


def feature_side(side: int, kernel_size: int, pad: int) -> int:
    """Side of the feature map the classifier gets: conv (padded), pool 2, valid conv, pool 2."""
    return conv_out(conv_out(conv_out(conv_out(side, kernel_size, 1, pad), 2, 2), kernel_size), 2, 2)


def min_input_size(kernel_size: int, padding: Any = "auto") -> int:
    return next(s for s in range(1, 1024) if feature_side(s, kernel_size, first_padding(padding, kernel_size, (s, s))) >= 1)


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
        padding: Any = "auto",
    ) -> None:
        super().__init__()
        k = kernel_size
        pad = first_padding(padding, k, input_size)
        out_hw = [feature_side(s, k, pad) for s in input_size]  # per axis, floor as torch does
        if min(out_hw) < 1:
            m = min_input_size(k, padding)
            raise ConfigError(
                f"input size {input_size[0]}x{input_size[1]} is too small for lenet with "
                f"model.kernel_size={k} and model.padding={padding}: the minimum is {m}x{m}"
            )
        pool_cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        bias = not batch_norm  # a norm right after a layer cancels its bias
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, k, padding=pad, bias=bias),
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
        in_channels, num_classes, input_size, cfg.kernel_size, cfg.pool, cfg.activation, cfg.dropout, cfg.batch_norm,
        cfg.padding,
    )
