"""Memory: what a device has free, and what a run will need, estimated before anything is allocated.

A size typed with a few zeros too many (model.classifier_width=2000000000, a resize to 100000 px,
dataset.train_size=1e8) would otherwise die in the allocator with a raw traceback, or be killed by
the OOM killer. The model is built on PyTorch's meta device (shapes, no storage) and run once there
on a batch of the real input shape, so parameters and the activations a training step keeps are
counted without allocating them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.checks import ConfigError


def available_bytes(device: torch.device) -> float:
    """Bytes free on the device: CUDA's own count, else the host's available RAM."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return math.inf


def gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


@dataclass
class Footprint:
    params: int  # parameters (and buffers) of the model
    activations: int  # elements of every leaf module's output for one training batch; -1 if not measured

    def training_bytes(self, optimizer_slots: int) -> float:
        """fp32 weights, their gradients and the optimizer's per-weight state, plus the activations the
        backward pass keeps and about as much again for their gradients (ResNet-50 at batch 128 on
        32x32 images: 11.7 GB, about what it takes)."""
        return 4.0 * self.params * (2 + optimizer_slots) + self.activation_bytes()

    def activation_bytes(self) -> float:
        """The activations a training step keeps for its backward, and as much again for their gradients."""
        return 4.0 * 2 * max(self.activations, 0)


def footprint(build: Callable[[], nn.Module], batch_shape: tuple[int, ...]) -> Footprint:
    """Build the model on the meta device and run a batch of `batch_shape` through it there."""
    try:
        with torch.device("meta"):
            model = build()
    except RuntimeError as err:  # sizes whose byte count overflows even without storage
        raise ConfigError(f"a layer of this model is too large to exist ({str(err).splitlines()[0]}); lower the "
                          f"model's sizes") from None
    params = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    elements = [0]

    def count(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and not getattr(module, "inplace", False):  # in place: no new tensor
            elements[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model.train()
        model(torch.empty(batch_shape, device="meta"))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: count the parameters alone
        elements[0] = -1
    finally:
        for handle in handles:
            handle.remove()
    return Footprint(params, elements[0] if elements[0] < 0 else elements[0] + math.prod(batch_shape))


def check_fits(what: str, need: float, device: torch.device, fix: str) -> None:
    """ConfigError with both numbers when `need` bytes are more than `device` has free."""
    free = available_bytes(device)
    if need > free:
        raise ConfigError(f"{what}: about {gigabytes(need)} of memory needed, but {device} has {gigabytes(free)} "
                          f"free; {fix}")
