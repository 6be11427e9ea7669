"""The model card: layer table, parameter counts, size, MACs/FLOPs and a published reference.

torchinfo builds the layer table users paste into reports and counts mult-adds per layer
(weights and biases, as torchinfo defines them); FLOPs are reported as 2 x MACs. The
dummy forward runs on zeros in eval mode, so neither the global RNG nor BatchNorm running
statistics change: carding a model does not change how it trains.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any

import torch
import torchinfo
from torch import nn

def lenet_params(in_channels: int, num_classes: int) -> int:
    """The paper's LeNet-5 for these channels and classes: 61,706 for 1 channel and 10 classes."""
    return (25 * in_channels * 6 + 6) + (6 * 25 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + 85 * num_classes


# Published parameter counts of the original forms, for comparison: ImageNet's 1000 classes, except
# LeNet-5, counted for the run's own channels and classes (the homework's "62,006 on 3x32x32").
REFERENCES: dict[str, tuple[str, int | Callable[[int, int], int]]] = {
    "lenet": ("LeNet-5 (LeCun et al. 1998, 32x32 input)", lenet_params),
    "alexnet": ("AlexNet original (Krizhevsky et al. 2012)", 62_378_344),
    "alexnet_original": ("AlexNet original (Krizhevsky et al. 2012)", 62_378_344),
    "vgg11": ("VGG-11 (ImageNet)", 132_863_336),
    "vgg13": ("VGG-13 (ImageNet)", 133_047_848),
    "vgg16": ("VGG-16 (ImageNet)", 138_357_544),
    "vgg19": ("VGG-19 (ImageNet)", 143_667_240),
    "googlenet": ("GoogLeNet (Szegedy et al. 2014, torchvision, no aux heads)", 6_624_904),
    "resnet18": ("ResNet-18 (ImageNet)", 11_689_512),
    "resnet34": ("ResNet-34 (ImageNet)", 21_797_672),
    "resnet50": ("ResNet-50 (ImageNet)", 25_557_032),
}


@dataclass
class ModelCard:
    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    params_total: int
    params_trainable: int
    model_size_mb: float  # parameters and buffers, 1 MB = 10^6 bytes
    macs_per_image: int
    flops_per_image: int  # 2 x MACs
    reference: dict[str, Any] | None  # {"name", "params", "ratio"} when a published count exists
    table: str  # torchinfo's layer table

    @property
    def reference_line(self) -> str | None:
        if not self.reference:
            return None
        ref = self.reference
        return (f"{ref['name']}: {human(ref['params'])}; this model: {human(self.params_total)}, "
                f"{ref['ratio']:.1%}")

    def summary_fields(self) -> dict[str, Any]:
        """What goes into summary.json (everything but the table)."""
        fields = asdict(self)
        del fields["table"], fields["model"], fields["num_classes"]
        fields["input_shape"] = list(self.input_shape)
        fields["reference_comparison"] = self.reference_line
        return fields

    def text(self) -> str:
        """model_summary.txt: the layer table plus the headline numbers."""
        lines = [
            f"model: {self.model}    input: {'x'.join(map(str, self.input_shape))}    classes: {self.num_classes}",
            self.table,
            f"params: {self.params_total:,} total, {self.params_trainable:,} trainable",
            f"size: {self.model_size_mb:.2f} MB (parameters and buffers)",
            f"compute per image: {human(self.macs_per_image)} MACs, {human(self.flops_per_image)} FLOPs",
        ]
        if self.reference_line:
            lines.append(f"reference: {self.reference_line}")
        return "\n".join(lines) + "\n"


def human(n: float) -> str:
    """62378344 -> '62.4M' (the units papers quote)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.1f}{unit}"
    return str(int(n))


def model_card(model: nn.Module, name: str, input_shape: tuple[int, int, int], num_classes: int,
               compare: bool = True) -> ModelCard:
    """Card a CPU-built model for images of input_shape (C, H, W); `compare`: with its family's published
    form, when it is that form (a custom arch is not)."""
    device = next(model.parameters()).device
    stats = torchinfo.summary(
        model,
        input_data=torch.zeros(1, *input_shape, device=device),  # zeros: no RNG draw
        col_names=("output_size", "num_params", "mult_adds"),
        row_settings=("var_names",),
        depth=4,
        mode="eval",  # no BatchNorm statistics update; torchinfo restores the mode afterwards
        verbose=0,
        device=device,
    )
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    reference = None
    if compare and name in REFERENCES:
        ref_name, ref_params = REFERENCES[name]
        if callable(ref_params):
            ref_params = ref_params(input_shape[0], num_classes)
            ref_name = f"{ref_name[:-1]}, {input_shape[0]} channel{'s' * (input_shape[0] > 1)}, {num_classes} classes)"
        reference = {"name": ref_name, "params": ref_params, "ratio": total / ref_params}
    return ModelCard(
        model=name,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        params_total=total,
        params_trainable=trainable,
        model_size_mb=round(size / 1e6, 6),  # exact to the byte
        macs_per_image=int(stats.total_mult_adds),
        flops_per_image=2 * int(stats.total_mult_adds),
        reference=reference,
        table=str(stats),
    )
