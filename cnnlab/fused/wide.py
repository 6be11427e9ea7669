"""N members' models as one wide model written out layer by layer (HFTA's fusion), without vmap.

Activations are laid out member-major along dim 1: [B, N*C, H, W] for feature maps, [B, N*F] for
features. Every layer that works per channel (pooling, activations, residual additions, flatten) is
then already right as the model's own code calls it, and the layers with weights become:

    Conv2d       one grouped convolution (groups x N) over the members' filters side by side
    Linear       one batched matmul over the members' weights [N, out, in]
    BatchNorm    one norm over the N*C channels, each member's running statistics its own rows
    Dropout      each member's mask drawn from its own generator, as F.dropout draws it alone
    others       a layer without weights that may work across channels (ResNet-20's zero-padding
                 shortcut) runs on each member's channels as a batch of their own

It runs eagerly, and a step dispatches about the ops of one lone step: vmap adds its batching to each
op, which in a launch-bound step of small models is much of the step (on an H100 the same fusion
written out for LeNet, benchmarks/fused_probe.py, took 3.35 ms per step of 12 members against 6.96 ms
through vmap: benchmarks/results/fused_step_h100.md; on the CPU this module's step of the 12 LeNets
dispatches 181 ops against vmap's 235). A model whose code mixes channels (torch.cat
over channels, a cross-channel norm, a reshape by fixed sizes) fails here or gives other outputs than
its own model: StackedModels.check finds both, and the group then runs through vmap.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from cnnlab.fused.members import ACTIVATION_TYPES, activation_kinds, dropout_mask, each_its_own

# layers that work on each channel alone: the model's own code may call them on the wide tensors
PER_CHANNEL = (*ACTIVATION_TYPES, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
               nn.Flatten, nn.Identity, nn.ReLU6, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus)


@dataclass
class WideFeed:
    """What one wide forward hands its layers: the stacked [N, ...] tensors and each member's generator."""

    n: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    generators: Sequence[torch.Generator] = ()


def _member_channels(x: torch.Tensor, n: int, channels: int, layer: str) -> None:
    if x.dim() < 2 or x.shape[1] != n * channels:
        raise ValueError(f"{layer} got input {tuple(x.shape)}, not {n} members x {channels} channels: the "
                         f"model's code mixes the members' channels")


def _settings(layer: nn.Module, *keys: str) -> SimpleNamespace:
    """What a wide layer needs of the layer it stands in for, without that layer's weights (the members'
    stacked rows are the weights; the copy's would take memory for nothing)."""
    return SimpleNamespace(**{key: getattr(layer, key) for key in keys})


class WideConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, name: str, feed: WideFeed) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={conv.padding_mode!r}")
        self.conv = _settings(conv, "in_channels", "out_channels", "stride", "padding", "dilation", "groups")
        self.name, self.feed = name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n = self.conv, self.feed.n
        _member_channels(x, n, c.in_channels, self.name)
        weight = self.feed.params[f"{self.name}.weight"]
        bias = self.feed.params.get(f"{self.name}.bias")
        return F.conv2d(x, weight.reshape(n * c.out_channels, *weight.shape[2:]),
                        None if bias is None else bias.reshape(-1), c.stride, c.padding, c.dilation, c.groups * n)


class WideLinear(nn.Module):
    def __init__(self, linear: nn.Linear, name: str, feed: WideFeed) -> None:
        super().__init__()
        self.linear, self.name, self.feed = _settings(linear, "in_features", "out_features"), name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, in_features = self.feed.n, self.linear.in_features
        if x.dim() != 2:
            raise ValueError(f"{self.name} got a {x.dim()}-d input; the wide form takes [batch, features]")
        _member_channels(x, n, in_features, self.name)
        xs = x.reshape(x.shape[0], n, in_features).transpose(0, 1)  # [N, B, in]
        weight = self.feed.params[f"{self.name}.weight"].transpose(1, 2)
        bias = self.feed.params.get(f"{self.name}.bias")
        out = torch.bmm(xs, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, weight)
        return out.transpose(0, 1).reshape(x.shape[0], n * self.linear.out_features)


class WideBatchNorm(nn.Module):
    """nn.BatchNorm1d/2d's forward over the N*C channels (its running statistics are the stacked rows)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, name: str, feed: WideFeed) -> None:
        super().__init__()
        if norm.momentum is None:
            raise ValueError(f"{name}: momentum=None (a cumulative average per member)")
        self.norm, self.name, self.feed = _settings(norm, "num_features", "momentum", "eps"), name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, name = self.norm, self.name
        _member_channels(x, self.feed.n, norm.num_features, name)
        mean, var = self.feed.buffers.get(f"{name}.running_mean"), self.feed.buffers.get(f"{name}.running_var")
        tracked = self.feed.buffers.get(f"{name}.num_batches_tracked")
        if self.training and tracked is not None:
            tracked.add_(1)
        weight, bias = self.feed.params.get(f"{name}.weight"), self.feed.params.get(f"{name}.bias")
        return F.batch_norm(x, None if mean is None else mean.view(-1), None if var is None else var.view(-1),
                            None if weight is None else weight.reshape(-1), None if bias is None else bias.reshape(-1),
                            self.training or mean is None, norm.momentum, norm.eps)


class WideDropout(nn.Module):
    def __init__(self, rates: list[float], feed: WideFeed) -> None:
        super().__init__()
        self.rates, self.feed = rates, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.feed.generators:
            return x
        shape = (x.shape[0], x.shape[1] // self.feed.n, *x.shape[2:])  # one member's, as its own forward draws it
        masks = [dropout_mask(shape, p, x.device, g, x.dtype) for p, g in zip(self.rates, self.feed.generators)]
        return x * torch.stack(masks, 1).view_as(x)


class WideActivation(nn.Module):
    """Each member its own activation: every choice is computed and the member's channels keep theirs."""

    def __init__(self, choices: Sequence[nn.Module], kinds: list[int], feed: WideFeed) -> None:
        super().__init__()
        self.choices, self.feed, self.kinds = nn.ModuleList(choices), feed, kinds
        # by layout, made once on the device: which channels take choice k (k >= 1)
        self.masks: dict[tuple[int, int, torch.device], list[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[1], x.dim(), x.device)
        if key not in self.masks:
            per_channel = torch.tensor(self.kinds).repeat_interleave(x.shape[1] // self.feed.n)
            kind = per_channel.view(1, -1, *[1] * (x.dim() - 2)).to(x.device)
            self.masks[key] = [kind == k for k in range(1, len(self.choices))]
        return each_its_own(self.choices, x, self.masks[key])


class WidePerMember(nn.Module):
    """A layer without weights that may work across channels (ResNet-20's zero-padding shortcut, a user's
    channel shuffle): each member's channels go through it as a batch of their own ([B, N*C, ...] as
    [B*N, C, ...]) and back."""

    def __init__(self, module: nn.Module, name: str, feed: WideFeed) -> None:
        super().__init__()
        self.module, self.name, self.feed = module, name, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b = self.feed.n, x.shape[0]
        if x.dim() < 2 or x.shape[1] % n:
            raise ValueError(f"{self.name} got input {tuple(x.shape)}, not {n} members' channels side by side")
        out = self.module(x.reshape(b * n, x.shape[1] // n, *x.shape[2:]))
        return out.reshape(b, n * out.shape[1], *out.shape[2:])


def wide_template(models: Sequence[nn.Module], feed: WideFeed) -> nn.Module:
    """A copy of the first model with its weighted layers, dropout and differing activations made wide.
    Raises ValueError for a layer the wide form does not know (the group then runs through vmap)."""
    template = copy.deepcopy(models[0])
    if any(True for _ in template.parameters(recurse=False)) or any(True for _ in template.buffers(recurse=False)):
        raise ValueError(f"{type(template).__name__} has weights of its own, outside its layers: the wide form "
                         f"cannot give each member its own")
    for name, module in list(template.named_modules()):
        if not name:
            continue
        parent, _, leaf = name.rpartition(".")
        owner = template.get_submodule(parent) if parent else template
        wide = _wide_layer(module, name, list(models), feed)
        if wide is not None:
            setattr(owner, leaf, wide)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise ValueError(f"{name} ({type(module).__name__}) has weights the wide form does not know")
        elif isinstance(module, nn.modules.dropout._DropoutNd):  # Dropout2d, AlphaDropout: their own draws
            raise ValueError(f"{name} ({type(module).__name__}) draws its own random numbers")
        elif not list(module.children()) and not isinstance(module, PER_CHANNEL):
            setattr(owner, leaf, WidePerMember(module, name, feed))
    return template


def _wide_layer(module: nn.Module, name: str, models: list[nn.Module], feed: WideFeed) -> nn.Module | None:
    """The wide stand-in of one layer, or None where the model's own layer works on wide tensors."""
    if type(module) is nn.Conv2d:
        return WideConv2d(module, name, feed)
    if type(module) is nn.Linear:
        return WideLinear(module, name, feed)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return WideBatchNorm(module, name, feed)
    if type(module) is nn.Dropout:
        rates = [m.get_submodule(name).p for m in models]
        return WideDropout(rates, feed) if any(rates) else nn.Identity()  # p=0 everywhere: no draws, as alone
    if isinstance(module, ACTIVATION_TYPES) and (differ := activation_kinds(models, name)):
        return WideActivation(copy.deepcopy(differ[0]), differ[1], feed)
    return None


def to_wide(x: torch.Tensor, n: int, batched_input: bool) -> torch.Tensor:
    """The members' inputs [N, B, C, ...], or the one input [B, C, ...] all take, as [B, N*C, ...]."""
    if batched_input:
        return x.transpose(0, 1).reshape(x.shape[1], n * x.shape[2], *x.shape[3:])
    return x.repeat(1, n, *[1] * (x.dim() - 2))


def from_wide(out: torch.Tensor, n: int) -> torch.Tensor:
    """Logits [B, N*K] as [N, B, K]."""
    if out.dim() != 2:
        raise ValueError(f"the model's output is {out.dim()}-d; the wide form takes [batch, classes]")
    return out.view(out.shape[0], n, -1).transpose(0, 1)
