"""Network in Network (Lin, Chen & Yan 2013), the paper's CIFAR-10 form: one class, an arch table.

Three mlpconv blocks; each is a kxk "same" conv then two 1x1 convs (a per-pixel MLP), every conv
followed by [BN +] act. Blocks 1 and 2 end with a 3/2 max pool and dropout (the paper's), padded by
1 so every size works and 32 -> 16 -> 8 and 28 -> 14 -> 7, the sizes of the reference Caffe model's
ceil-mode pools. The last 1x1 conv has num_classes channels; global average pooling turns its maps
into the logits, with no fully connected layer.

That last conv is left linear (no act, no BN), the one change from the reference model, which has a
ReLU there: a ReLU clamps every logit to >= 0, and a class whose map turns all-negative gets no
gradient again (a dead class). init_weights starts the conv at N(0, 0.01) through zero_init_last(),
as a classifier head is started near 0 elsewhere: the first loss is ln(classes), where its He init
(std sqrt(2/num_classes) over 192 inputs) would give logits of several units. Exactly 0 would stop
all gradient to the layers below it in the first step.

batch_norm defaults to true although the 2013 net has none: without it (batch_norm=false: biased
convs, no norm) SGD at our default lr 0.05 / momentum 0.9 barely moves on a fixed Fashion-MNIST batch (loss 2.30
-> ~1.6 in 30 steps, with spikes; at lr 0.01 -> 2.13), where BN gets to ~0.3.
"""
from dataclasses import dataclass
from functools import partial
from typing import Union

from torch import Tensor, nn

from cnnlab.models import ModelConfig, register
from cnnlab.models.layers import make_activation, make_norm2d

NUM_CLASSES = "num_classes"  # placeholder in a table: this conv outputs one map per class
Block = tuple[int, tuple[Union[int, str], ...]]  # (kernel of the first conv, channels of each conv)

ARCHS: dict[str, tuple[Block, ...]] = {
    "nin": ((5, (192, 160, 96)), (5, (192, 192, 192)), (3, (192, 192, NUM_CLASSES))),
}


@dataclass
class NiNConfig(ModelConfig):
    dropout: float = 0.5  # after the pools of blocks 1 and 2, as in the paper
    batch_norm: bool = True  # not in the 2013 net, which barely learns at lr 0.05 without it (see above)


class NiN(nn.Module):
    def __init__(
        self,
        arch: tuple[Block, ...] = ARCHS["nin"],
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if arch[-1][1][-1] != NUM_CLASSES:
            raise ValueError(f"the last conv of a NiN arch must be {NUM_CLASSES!r}: {arch}")
        blocks = []
        channels = in_channels
        for b, (kernel, widths) in enumerate(arch):
            layers: list[nn.Module] = []
            for i, width in enumerate(widths):
                logits = width == NUM_CLASSES
                width = num_classes if logits else int(width)
                k = kernel if i == 0 else 1
                # No conv bias under BN (its shift replaces it); the logits conv keeps its bias.
                layers.append(nn.Conv2d(channels, width, k, padding=k // 2, bias=logits or not batch_norm))
                if not logits:
                    layers += [make_norm2d(width, batch_norm), make_activation(activation)]
                channels = width
            if b < len(arch) - 1:
                layers += [nn.MaxPool2d(3, stride=2, padding=1), nn.Dropout(dropout)]
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def zero_init_last(self) -> None:
        """Start the logits conv near 0 (called by init_weights under init=kaiming), as the other
        families' heads: N(0, 0.01), not exactly 0, so gradient reaches every layer from step one."""
        last = self.features[-1][-1]
        nn.init.normal_(last.weight, 0.0, 0.01)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(self.features(x)))


def _nin(table: str, cfg: NiNConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> NiN:
    # input_size is not needed: "same" convs and padded 3/2 pools (ceil(s/2)) accept any size >= 1.
    return NiN(ARCHS[table], in_channels, num_classes, cfg.activation, cfg.dropout, cfg.batch_norm)


for _name in ARCHS:
    register(_name, NiNConfig)(partial(_nin, _name))
