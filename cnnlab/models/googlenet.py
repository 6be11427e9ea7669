"""GoogLeNet / Inception v1 (Szegedy et al. 2014) for small images: one class, an arch table.

Inception(c1, (c2a, c2b), (c3a, c3b), c4) has four parallel branches, concatenated along channels
(c1 + c2b + c3b + c4 outputs): 1x1 conv; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1. The table is
d2l's (the paper's inception 3a-5b). The stem is 3x3 conv (64) -> 1x1 conv (64) -> 3x3 conv (192),
all stride 1 with no max pool: the paper's 7x7 stride-2 conv and two max pools would shrink a 32-px
image to 4 px before the first Inception. Padded 3/2 max pools between stages 3 -> 4 -> 5 give
32 -> 16 -> 8 (any input of at least 1x1 builds); then global average pooling, dropout and one
Linear(1024 -> classes). The paper's two auxiliary classifiers are left out, as in d2l: they fed
extra gradient to the middle stages, which BN after every conv makes unnecessary.
"""
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d

# One Inception block: (c1, (c2a, c2b), (c3a, c3b), c4).
InceptionSpec = tuple[int, tuple[int, int], tuple[int, int], int]

ARCHS: dict[str, tuple[tuple[InceptionSpec, ...], ...]] = {
    "googlenet": (
        # b3 (paper: 3a, 3b)
        ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64)),
        # b4 (4a-4e)
        (
            (192, (96, 208), (16, 48), 64),
            (160, (112, 224), (24, 64), 64),
            (128, (128, 256), (24, 64), 64),
            (112, (144, 288), (32, 64), 64),
            (256, (160, 320), (32, 128), 128),
        ),
        # b5 (5a, 5b)
        ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128)),
    ),
}
STEM = (64, 64, 192)  # channels of the stem's 3x3, 1x1 and 3x3 convs


@dataclass
class GoogLeNetConfig(ModelConfig):
    dropout: float = 0.4  # before the final linear layer (the paper's 40%)
    batch_norm: bool = True  # after every conv (as in Inception v2 / torchvision); false = the 2014 net


def conv_block(in_channels: int, out_channels: int, kernel: int, activation: str, batch_norm: bool) -> nn.Sequential:
    """kxk "same" conv [+ BN] + act; the conv has a bias only without BN (BN's shift replaces it)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=not batch_norm),
        make_norm2d(out_channels, batch_norm),
        make_activation(activation),
    )


class Inception(nn.Module):
    def __init__(
        self,
        in_channels: int,
        c1: int,
        c2: tuple[int, int],
        c3: tuple[int, int],
        c4: int,
        activation: str = "relu",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        conv = partial(conv_block, activation=activation, batch_norm=batch_norm)
        self.b1 = conv(in_channels, c1, 1)
        self.b2 = nn.Sequential(conv(in_channels, c2[0], 1), conv(c2[0], c2[1], 3))
        self.b3 = nn.Sequential(conv(in_channels, c3[0], 1), conv(c3[0], c3[1], 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, c4, 1))
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    def __init__(
        self,
        arch: tuple[tuple[InceptionSpec, ...], ...] = ARCHS["googlenet"],
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.4,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        conv = partial(conv_block, activation=activation, batch_norm=batch_norm)
        self.stem = nn.Sequential(
            conv(in_channels, STEM[0], 3), conv(STEM[0], STEM[1], 1), conv(STEM[1], STEM[2], 3)
        )
        channels = STEM[2]
        stages = []
        for s, specs in enumerate(arch):
            blocks: list[nn.Module] = [nn.MaxPool2d(3, stride=2, padding=1)] if s > 0 else []  # ceil(s/2) px
            for c1, c2, c3, c4 in specs:
                block = Inception(channels, c1, tuple(c2), tuple(c3), c4, activation, batch_norm)
                blocks.append(block)
                channels = block.out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))


def _googlenet(
    table: str, cfg: GoogLeNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]
) -> GoogLeNet:
    # input_size is not needed: "same" convs and padded 3/2 pools (ceil(s/2)) accept any size >= 1.
    return GoogLeNet(ARCHS[table], in_channels, num_classes, cfg.activation, cfg.dropout, cfg.batch_norm)


for _name in ARCHS:
    register(_name, GoogLeNetConfig)(partial(_googlenet, _name))
