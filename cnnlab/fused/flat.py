"""A fused group's trainable parameters in one buffer [N, D]: row i is member i's parameters, flattened one
after another (as FSDP's flat parameters, one row per model). Three views see the same memory:

    values[i, a:b]           member i's parameter `name` (a, b: its span), given to its own module as .data
    stacked[name]            [N, *shape]: the leaf the fused forward takes, its .grad a view of grads
    values, grads            [N, D]: what one fused optimizer step updates with per-member [N, 1] numbers

So an optimizer step over all members and all parameters is a handful of whole-buffer ops (fused/optim.py),
and each member's optimizer state can be rows of buffers shaped like `values`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn


class FlatParams:
    """The members' trainable parameters (same names, shapes and dtype) in one [N, D] buffer."""

    def __init__(self, members: Sequence[dict[str, nn.Parameter]]) -> None:
        first = members[0]
        dtypes = {p.dtype for p in first.values()}
        if len(dtypes) > 1:
            raise ValueError(f"the model's trainable parameters have several dtypes ({sorted(map(str, dtypes))}); "
                             f"a fused group keeps them in one buffer of one dtype")
        self.names = list(first)
        self.shapes = {name: tuple(p.shape) for name, p in first.items()}
        self.spans: dict[str, tuple[int, int]] = {}
        end = 0
        for name, p in first.items():
            self.spans[name] = (end, end + p.numel())
            end += p.numel()
        n, like = len(members), next(iter(first.values()), torch.empty(0))
        self.values = torch.empty(n, end, dtype=like.dtype, device=like.device)
        self.grads = torch.zeros_like(self.values)  # filled in place by each backward: the leaves' .grad views it
        self.stacked: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in self.names:
                a, b = self.spans[name]
                self.values[:, a:b] = torch.stack([m[name].detach().reshape(-1) for m in members])
                leaf = self.stacked[name] = self.view(self.values, name).detach().requires_grad_()
                leaf.grad = self.view(self.grads, name)
                for i, member in enumerate(members):
                    member[name].data = self.row(self.values, name, i)
                    member[name].grad = self.row(self.grads, name, i)  # what a member's own optimizer would read

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The [N, *shape] view of one parameter's columns of a buffer shaped like values."""
        a, b = self.spans[name]
        return flat[:, a:b].view(flat.shape[0], *self.shapes[name])

    def row(self, flat: torch.Tensor, name: str, i: int) -> torch.Tensor:
        """Member i's part of a buffer shaped like values, shaped as the parameter (contiguous)."""
        a, b = self.spans[name]
        return flat[i, a:b].view(self.shapes[name])

    def zero_grad(self) -> None:
        self.grads.zero_()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), its gradients summed into the flat buffer. Torch warns (once) that a row's gradient
        is not laid out as it would lay out a lone parameter's; here the shared buffer is the point."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward()
