"""ResNet (He et al. 2015) for small images: one class, depth from an arch table.

The stem is CIFAR-style (3x3 conv, stride 1, no max pool): the ImageNet stem (7x7 stride 2 + max
pool) would shrink a 32-px image to 8 px before the first block. Stage i has depths[i] blocks of
widths[i] channels; the first stage keeps the resolution, each later one halves it (stride 2), so
any input of at least 1x1 builds. A new depth is one table row: resnet20 = BasicBlock, (3, 3, 3),
widths (16, 32, 64); resnet50 = a Bottleneck block with expansion 4; an "imagenet" stem goes in
_make_stem.
"""
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d


@dataclass
class ResNetConfig(ModelConfig):
    batch_norm: bool = True  # False replaces every BatchNorm with Identity (convs then get a bias)


class BasicBlock(nn.Module):
    """conv3x3(stride) - norm - act - conv3x3 - norm, plus the shortcut, then act."""

    expansion = 1  # output channels = width * expansion (4 for a future Bottleneck)

    def __init__(self, in_channels: int, width: int, stride: int, activation: str, batch_norm: bool) -> None:
        super().__init__()
        out_channels = width * self.expansion
        bias = not batch_norm  # a norm right after a conv cancels its bias
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm2d(width, batch_norm)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=bias)
        self.bn2 = make_norm2d(out_channels, batch_norm)
        self.act2 = make_activation(activation)
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut (option B of the paper): 1x1 conv to the new shape.
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                make_norm2d(out_channels, batch_norm),
            )
        else:
            self.shortcut = nn.Identity()

    def zero_init_last(self) -> None:
        """Make the residual branch output 0, so the block starts as the identity (called by init_weights).

        The network then starts as a shallow one whose signal does not grow with depth, which trains
        faster and tolerates larger learning rates (Goyal et al. 2017; torchvision's
        zero_init_residual). Without BN we zero the last conv instead, as Fixup (Zhang et al. 2019)
        does; the conv still gets a gradient from its non-zero input, so it learns from step one.
        """
        if isinstance(self.bn2, nn.BatchNorm2d):
            nn.init.zeros_(self.bn2.weight)
        else:
            nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


@dataclass(frozen=True)
class ResNetArch:
    block: type[nn.Module]  # BasicBlock (a Bottleneck later)
    depths: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # block width per stage; the stem has widths[0]
    stem: str = "cifar"  # only "cifar" so far


ARCHS: dict[str, ResNetArch] = {
    "resnet18": ResNetArch(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetArch(BasicBlock, (3, 4, 6, 3)),
}


def _make_stem(kind: str, in_channels: int, width: int, activation: str, batch_norm: bool) -> nn.Module:
    if kind == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=not batch_norm),
            make_norm2d(width, batch_norm),
            make_activation(activation),
        )
    raise ValueError(f"unknown ResNet stem {kind!r}; known: cifar")


class ResNet(nn.Module):
    def __init__(
        self,
        arch: ResNetArch,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(arch.depths) != len(arch.widths):
            raise ValueError(f"ResNetArch needs one width per stage: {arch}")
        self.stem = _make_stem(arch.stem, in_channels, arch.widths[0], activation, batch_norm)
        channels = arch.widths[0]
        stages = []
        for i, (depth, width) in enumerate(zip(arch.depths, arch.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1  # downsample at the start of every stage but the first
                blocks.append(arch.block(channels, width, stride, activation, batch_norm))
                channels = width * arch.block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def _resnet(table: str, cfg: ResNetConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> ResNet:
    # input_size is not needed: the CIFAR stem and stride-2 3x3 convs (ceil(s/2)) accept any size >= 1.
    return ResNet(ARCHS[table], in_channels, num_classes, cfg.activation, cfg.dropout, cfg.batch_norm)


# One registered builder per table row: resnet18, resnet34.
for _name in ARCHS:
    register(_name, ResNetConfig)(partial(_resnet, _name))
