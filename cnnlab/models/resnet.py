"""ResNet (He et al. 2015): one class, depth from an arch table.

Stage i has depths[i] blocks of widths[i] channels (x4 out for Bottleneck); the first stage keeps the
resolution, each later one halves it (stride 2 on the first block's 3x3 conv). Two stems (model.stem):
- "cifar" (default): 3x3 conv, stride 1, no max pool. The ImageNet stem would shrink a 32-px image to
  8 px before the first block.
- "imagenet": 7x7 conv stride 2 + max pool 3/2, as torchvision; resnet18/resnet50 then have exactly
  torchvision's parameter counts at 224 px / 1000 classes.
Both stems and every stride-2 conv give ceil(s/2) or more, so any input of at least 1x1 builds.

Depth counts the weighted layers on the longest path, as the paper does: the stem conv, every conv
inside the blocks (2 per BasicBlock, 3 per Bottleneck) and the final linear layer; shortcut
projections are not counted. resnet18 = 1 + 2*(2+2+2+2) + 1, resnet34 = 1 + 2*16 + 1,
resnet20 = 1 + 2*(3+3+3) + 1, resnet26 = 1 + 3*(2+2+2+2) + 1, resnet50 = 1 + 3*16 + 1.
resnet11 (BasicBlock, one block per stage) is the exception: by this rule it has 1 + 2*4 + 1 = 10
layers (timm's resnet10t uses the same table); the name is kept because configs refer to it.
"""
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn
from torch.nn import functional as F

from cnnlab.checks import check_choice
from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d

STEMS: tuple[str, ...] = ("cifar", "imagenet")  # accepted values of model.stem
SHORTCUTS: tuple[str, ...] = ("projection", "identity_pad")  # ResNetArch.shortcut (a table field, not a key)


@dataclass
class ResNetConfig(ModelConfig):
    batch_norm: bool = True  # False replaces every BatchNorm with Identity (convs then get a bias)
    stem: str = "cifar"  # cifar (3x3 stride 1, no pool) | imagenet (7x7 stride 2 + 3x3/2 max pool)

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.stem", self.stem, STEMS)


class PadShortcut(nn.Module):
    """Option A shortcut of the paper: subsample by `stride`, append zero channels; no parameters.

    The CIFAR ResNets of the paper (resnet20 ... resnet110) use it, which is why their counts
    (0.27M for resnet20) have no 1x1 projection convs in them.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"identity_pad shortcut cannot shrink {in_channels} to {out_channels} channels")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # ceil(s/stride) px, the same as the 3x3 pad-1 conv
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "identity_pad":
        return PadShortcut(in_channels, out_channels, stride)
    if kind == "projection":
        # Option B of the paper (and torchvision's downsample): 1x1 conv to the new shape.
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not batch_norm),
            make_norm2d(out_channels, batch_norm),
        )
    raise ValueError(f"unknown ResNet shortcut {kind!r}; known: {', '.join(SHORTCUTS)}")


class BasicBlock(nn.Module):
    """conv3x3(stride) - norm - act - conv3x3 - norm, plus the shortcut, then act."""

    expansion = 1  # output channels = width * expansion

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        activation: str,
        batch_norm: bool,
        shortcut: str = "projection",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.zero_init = zero_init  # read by zero_init_last
        out_channels = width * self.expansion
        bias = not batch_norm  # a norm right after a conv cancels its bias
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm2d(width, batch_norm)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=bias)
        self.bn2 = make_norm2d(out_channels, batch_norm)
        self.act2 = make_activation(activation)
        self.shortcut = _make_shortcut(shortcut, in_channels, out_channels, stride, batch_norm)

    def zero_init_last(self) -> None:
        """Make the residual branch output 0, so the block starts as the identity (called by init_weights).

        The network then starts as a shallow one whose signal does not grow with depth, which trains
        faster and tolerates larger learning rates (Goyal et al. 2017; torchvision's
        zero_init_residual). Without BN we zero the last conv instead, as Fixup (Zhang et al. 2019)
        does; the conv still gets a gradient from its non-zero input, so it learns from step one.
        """
        if not self.zero_init:
            return
        if isinstance(self.bn2, nn.BatchNorm2d):
            nn.init.zeros_(self.bn2.weight)
        else:
            nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1 - norm - act - conv3x3(stride) - norm - act - conv1x1 (x4 channels) - norm, + shortcut, act.

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"); the paper put it on the first 1x1,
    which then skips 3/4 of the input pixels.
    """

    expansion = 4  # output channels = width * expansion

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        activation: str,
        batch_norm: bool,
        shortcut: str = "projection",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.zero_init = zero_init  # read by zero_init_last
        out_channels = width * self.expansion
        bias = not batch_norm
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=bias)
        self.bn1 = make_norm2d(width, batch_norm)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = make_norm2d(width, batch_norm)
        self.act2 = make_activation(activation)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=bias)
        self.bn3 = make_norm2d(out_channels, batch_norm)
        self.act3 = make_activation(activation)
        self.shortcut = _make_shortcut(shortcut, in_channels, out_channels, stride, batch_norm)

    def zero_init_last(self) -> None:
        """As BasicBlock.zero_init_last, on the last norm (or the last conv without BN)."""
        if not self.zero_init:
            return
        if isinstance(self.bn3, nn.BatchNorm2d):
            nn.init.zeros_(self.bn3.weight)
        else:
            nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


@dataclass(frozen=True)
class ResNetArch:
    block: type[nn.Module]  # BasicBlock | Bottleneck
    depths: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # block width per stage; the stem has widths[0]
    shortcut: str = "projection"  # projection (1x1 conv, option B) | identity_pad (option A, no params)
    zero_init_last: bool = True  # start every block as the identity (see BasicBlock.zero_init_last)


ARCHS: dict[str, ResNetArch] = {
    "resnet11": ResNetArch(BasicBlock, (1, 1, 1, 1)),  # 10 weighted layers, see the module docstring
    "resnet18": ResNetArch(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetArch(BasicBlock, (3, 4, 6, 3)),
    # The paper's CIFAR net (section 4.2): 3 stages of 16/32/64 channels and option-A shortcuts, so it has
    # the paper's 0.27M parameters (1x1 projections would add ~2.8k and make it a different model).
    # No zero init here (the paper had none): with option A and every branch at 0, the net starts as a
    # linear model on the stem's 16 pooled channels, and the zeroed BN scales only get gradient through
    # the N(0, 0.01) head, so it barely moves at first (Fashion-MNIST, 64 images, 30 SGD steps at lr 0.05:
    # loss 2.30 -> 1.95 with zero init, -> 0.03-0.10 without). 20 layers are shallow enough for plain He init.
    "resnet20": ResNetArch(BasicBlock, (3, 3, 3), (16, 32, 64), shortcut="identity_pad", zero_init_last=False),
    "resnet26": ResNetArch(Bottleneck, (2, 2, 2, 2)),
    "resnet50": ResNetArch(Bottleneck, (3, 4, 6, 3)),
}


def _make_stem(kind: str, in_channels: int, width: int, activation: str, batch_norm: bool) -> nn.Module:
    if kind == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=not batch_norm),
            make_norm2d(width, batch_norm),
            make_activation(activation),
        )
    if kind == "imagenet":
        # torchvision's stem: 224 px -> 112 (conv) -> 56 (pool) before the first stage.
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=not batch_norm),
            make_norm2d(width, batch_norm),
            make_activation(activation),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    raise ValueError(f"unknown ResNet stem {kind!r}; known: {', '.join(STEMS)}")


class ResNet(nn.Module):
    def __init__(
        self,
        arch: ResNetArch,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = True,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        if len(arch.depths) != len(arch.widths):
            raise ValueError(f"ResNetArch needs one width per stage: {arch}")
        self.stem = _make_stem(stem, in_channels, arch.widths[0], activation, batch_norm)
        channels = arch.widths[0]
        stages = []
        for i, (depth, width) in enumerate(zip(arch.depths, arch.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1  # downsample at the start of every stage but the first
                blocks.append(
                    arch.block(channels, width, stride, activation, batch_norm, arch.shortcut, arch.zero_init_last)
                )
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
    # input_size is not needed: both stems and the stride-2 convs (ceil(s/2)) accept any size >= 1.
    return ResNet(ARCHS[table], in_channels, num_classes, cfg.activation, cfg.dropout, cfg.batch_norm, cfg.stem)


# One registered builder per table row: resnet11, resnet18, resnet20, resnet26, resnet34, resnet50.
for _name in ARCHS:
    register(_name, ResNetConfig)(partial(_resnet, _name))
