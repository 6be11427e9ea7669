"""What both fused forms (stacked.py's vmap, wide.py's layers written out) share about the members' own
layers: which activations a group may choose per member, and F.dropout's draws from a member's generator."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU)


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F.dropout's noise on the CPU, from the member's generator: p=0 and p=1 draw nothing, as there.
    dtype: the activation's (a bf16 activation stays bf16; the draws are the same)."""
    if p == 0:
        return torch.ones(shape, device=device, dtype=dtype)
    if p == 1:
        return torch.zeros(shape, device=device, dtype=dtype)
    noise = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p, generator=generator)
    return noise.div_(1 - p)


def each_its_own(choices: Sequence[nn.Module], x: torch.Tensor, takes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every activation choice computed on x, each member keeping its own: takes[k - 1] is true where choice k
    (k >= 1) applies, choice 0 elsewhere. The choices not taken get zero gradient, as alone."""
    out = choices[0](x)
    for take, act in zip(takes, choices[1:]):
        out = torch.where(take, act(x), out)
    return out


def activation_kinds(models: list[nn.Module], name: str) -> tuple[list[nn.Module], list[int]] | None:
    """The distinct activations the members use at `name` and each member's index among them; None where
    they all use one."""
    own = [m.get_submodule(name) for m in models]
    choices = list({repr(a): a for a in own}.values())  # one per distinct activation (and its settings)
    if len(choices) == 1:
        return None
    return choices, [[repr(c) for c in choices].index(repr(a)) for a in own]
