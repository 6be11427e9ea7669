"""N members' models as one wide model, in one of two forms: "wide" (wide.py: the fusion HFTA writes
out by hand, layer by layer, for the layers it knows) or "vmap": torch.func's vmap over functional_call,
whose batching rules turn each convolution into one grouped convolution and each linear layer into one
batched matmul, for any model, at the cost of vmap's batching on every op. What follows is the vmap
form's; the wide form's dropout and activations work alike (wide.py).

The members' trainable parameters live in one [N, D] buffer (flat.py) that the fused forward sees as
one [N, ...] tensor per parameter; buffers and frozen parameters are stacked [N, ...] tensors. The
members' own modules keep working on views of their rows, so a member's optimizer, scheduler, doctor,
evaluation and checkpoints see a plain model of their own, and the group's optimizer step (optim.py)
writes straight into the buffer: no copy per step. BatchNorm's running statistics are updated in place
per member inside vmap.

Dropout draws per member, outside vmap: each member's masks come from its own generator, with the
very calls F.dropout makes on the CPU (bernoulli_(1 - p), then / (1 - p)), so on the CPU a member gets
bitwise the masks its lone run gets. The masks enter the vmapped forward as inputs, one per dropout
call, in call order (traced once per batch size).

Members may choose different activations: where they do, the template computes each choice and keeps
the member's (torch.where on the member's kind, a vmapped input). An extra elementwise op per choice
per site, against one group instead of one per activation.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from cnnlab.engine import StepContext
from cnnlab.fused.flat import FlatParams
from cnnlab.fused.members import ACTIVATION_TYPES, activation_kinds, dropout_mask, each_its_own
from cnnlab.fused.wide import WideDropout, WideFeed, from_wide, to_wide, wide_template


class _Feed:
    """What one fused forward hands the template's layers: dropout masks in call order, activation kinds."""

    def __init__(self) -> None:
        self.masks: Iterator[torch.Tensor] | None = None
        self.kinds: torch.Tensor | None = None  # per activation site, which of its activations this member uses
        self.calls: list[tuple[str, tuple[int, ...]]] | None = None  # set while tracing: (layer, input shape) per call


class _FedDropout(nn.Module):
    """Stands in for nn.Dropout in the fused template: multiplies by the member's mask."""

    def __init__(self, feed: _Feed, name: str) -> None:
        super().__init__()
        self.feed, self.name = feed, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feed.calls is not None:
            self.feed.calls.append((self.name, tuple(x.shape)))
            return x
        if not self.training or self.feed.masks is None:
            return x
        return x * next(self.feed.masks)


class _FedActivation(nn.Module):
    """Stands in for an activation the members choose differently: each member gets its own. Every choice
    is computed and the member's kept (torch.where), so the others' gradients are zero, as they are alone."""

    def __init__(self, feed: _Feed, site: int, choices: Sequence[nn.Module]) -> None:
        super().__init__()
        self.feed, self.site, self.choices = feed, site, nn.ModuleList(choices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.feed.kinds[self.site]
        return each_its_own(self.choices, x, [kind == k for k in range(1, len(self.choices))])


def _in_fp32(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0].float(),)


def _template(models: Sequence[nn.Module], feed: _Feed) -> tuple[nn.Module, list[str], torch.Tensor]:
    """A copy of the first model whose dropout layers take masks and whose activations follow each member;
    the dropout layers' names, and the members' activation kinds [N, sites]."""
    template = copy.deepcopy(models[0])
    names, kinds = [], []
    for name, module in list(template.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = template.get_submodule(parent) if parent else template
        if type(module) is nn.Dropout and not any(m.get_submodule(name).p for m in models):
            setattr(owner, leaf, nn.Identity())  # p=0 for every member: no draws, as F.dropout makes none
        elif type(module) is nn.Dropout:
            setattr(owner, leaf, _FedDropout(feed, name))
            names.append(name)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            # under bf16 autocast a norm gets a conv's bf16 output, and vmap's CUDA batch-norm backward
            # refuses bf16 input with fp32 running statistics; in fp32 (as autocast leaves norms) it runs
            module.register_forward_pre_hook(_in_fp32)
        elif isinstance(module, ACTIVATION_TYPES) and (differ := activation_kinds(models, name)):
            setattr(owner, leaf, _FedActivation(feed, len(kinds), copy.deepcopy(differ[0])))
            kinds.append(differ[1])
    return template, names, torch.tensor(kinds, dtype=torch.long).reshape(len(kinds), len(models)).T


class StackedModels:
    """The members' models stacked for one fused step. Build a new one when the members change.

    form: "vmap" (torch.func over the template above: any model) or "wide" (wide.py: the layers written
    out, without vmap's batching on every op, for models of the layers it knows; raises ValueError otherwise)."""

    def __init__(self, models: Sequence[nn.Module], form: str = "vmap") -> None:
        if form not in ("vmap", "wide"):
            raise ValueError(f"form={form!r}: the fused forms are vmap and wide")
        self.models, self.form = list(models), form
        _check_alike(self.models)
        # the template first: a copy of member 0 made before its tensors become views of the group's buffers
        self.feed, self.wide = _Feed(), WideFeed(len(self.models))
        if form == "wide":
            self.template, self.dropout_names = wide_template(self.models, self.wide), []
        else:
            self.template, self.dropout_names, kinds = _template(self.models, self.feed)
            self.kinds = kinds.to(next(self.models[0].parameters()).device)
            self.rates = [{n: m.get_submodule(n).p for n in self.dropout_names} for m in self.models]
            self._calls: dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]] = {}
        named = [dict(m.named_parameters()) for m in self.models]
        self.flat = FlatParams([{n: p for n, p in d.items() if p.requires_grad} for d in named])
        frozen = _stack([{n: p for n, p in d.items() if not p.requires_grad} for d in named])
        self.params = {n: self.flat.stacked.get(n, frozen.get(n)) for n in named[0]}
        self.buffers = _stack([dict(m.named_buffers()) for m in self.models])
        self.wide.params, self.wide.buffers = self.params, self.buffers
        self.unused: list[str] = []  # trainable parameters the forward does not use (found by check)

    def forward(self, x: torch.Tensor, generators: Sequence[torch.Generator],
                buffers: dict[str, torch.Tensor] | None = None, batched_input: bool = True) -> torch.Tensor:
        """Logits [N, B, classes] of the members' inputs x [N, B, ...], or of one input x [B, ...] they all
        take (batched_input=False: vmap then runs the first convolution as one wider one; the wide form
        repeats x for each member); dropout drawn from each member's generator. buffers: others than the
        members' (a trial forward that leaves no statistics)."""
        if self.form == "wide":
            self.wide.buffers, self.wide.generators = self.buffers if buffers is None else buffers, generators
            try:
                return from_wide(self.template(to_wide(x, len(self.models), batched_input)), len(self.models))
            finally:
                self.wide.buffers, self.wide.generators = self.buffers, ()
        one_input = x if not batched_input else x[0]
        masks = self._masks(one_input, generators) if self.template.training else ()

        def one(params: dict, buffers: dict, inputs: torch.Tensor, member_masks: tuple, kinds: torch.Tensor) -> torch.Tensor:
            self.feed.masks, self.feed.kinds = iter(member_masks), kinds
            try:
                return functional_call(self.template, (params, buffers), (inputs,))
            finally:
                self.feed.masks = self.feed.kinds = None

        return vmap(one, in_dims=(0, 0, 0 if batched_input else None, 0, 0), randomness="error")(
            self.params, self.buffers if buffers is None else buffers, x, masks, self.kinds)

    def check(self, x: torch.Tensor, ctx: StepContext) -> None:
        """A trial forward and backward on x [N, B, ...] that changes nothing but raises what the form cannot
        run (a user's model that draws random numbers itself, which would not be each member's own draws;
        under vmap one that calls .item()), and a comparison with each member's own model: a layer the
        template does not follow per member (a user's own activation that differs between members, code
        that mixes the members' channels) gives other outputs, and the group must not train that way."""
        self.template.train()
        rng = _global_rng(x.device)
        with ctx.autocast():
            out = self.forward(x, [torch.Generator(x.device) for _ in self.models],
                               {k: v.clone() for k, v in self.buffers.items()})
        if not torch.equal(rng, _global_rng(x.device)):  # vmap refuses such draws itself (randomness="error")
            raise ValueError("the model draws random numbers in its forward (F.dropout in its code, say), which "
                             "would not be each member's own draws")
        leaves = list(self.flat.stacked.values())
        grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True) if leaves else ()
        # a parameter the forward never uses gets no gradient alone, so its optimizer skips it (optim.py)
        self.unused = [name for name, grad in zip(self.flat.stacked, grads) if grad is None]
        self.template.eval()
        # in full fp32 (cudnn's TF32 off): the two sides then differ by summation order alone
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            fused = self.forward(x, [])
            for i, model in enumerate(self.models):
                model.eval()
                own = model(x[i])
                if (fused[i] - own).abs().max() > 1e-3 * own.abs().max() + 1e-5:
                    raise ValueError(f"member {i}'s fused outputs differ from its own model's: a layer differs "
                                     f"between members in a way the fused model does not follow")

    @property
    def draws_dropout(self) -> bool:
        """Whether a training forward draws dropout masks (a member with model.dropout > 0)."""
        if self.form == "wide":
            return any(isinstance(m, WideDropout) for m in self.template.modules())
        return bool(self.dropout_names)  # vmap's layers draw (or feed p=0 masks) from the generators given

    def train(self) -> None:
        self.template.train()

    def zero_grad(self) -> None:
        """Before a backward: the gradients are summed into the flat buffer, which the members' .grad view."""
        self.flat.zero_grad()

    def release(self) -> None:
        """The members keep their values in storage of their own, so the stack can go."""
        for model in self.models:
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.data = tensor.data.clone()
                if isinstance(tensor, nn.Parameter):
                    tensor.grad = None

    def _masks(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, ...]:
        """One [N, ...] mask per dropout call, each member's drawn in its own forward's order, as F.dropout's;
        x: one member's input [B, ...]."""
        if not self.dropout_names:
            return ()
        per_member = [[dropout_mask(shape, rates[name], x.device, generator) for name, shape in self._dropout_calls(x)]
                      for rates, generator in zip(self.rates, generators)]
        return tuple(torch.stack(call) for call in zip(*per_member))

    def _dropout_calls(self, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
        """The dropout calls of one forward, in order, with their input shapes, for one member's input x."""
        key = tuple(x.shape)
        if key not in self._calls:
            self.feed.calls = []
            try:
                with torch.no_grad():
                    one = {k: v[0] for k, v in self.params.items()}
                    state = {k: v[0].clone() for k, v in self.buffers.items()}  # the trace leaves no statistics behind
                    self.feed.kinds = self.kinds[0]
                    functional_call(self.template, (one, state), (x,))
                self._calls[key] = self.feed.calls
            finally:
                self.feed.calls = self.feed.kinds = None
        return self._calls[key]


def _global_rng(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _stack(tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One [N, ...] tensor per name, without gradient (buffers; frozen parameters, which so stay frozen);
    each member's tensor becomes a view of its row."""
    stacked = {}
    for name in tensors[0]:
        rows = torch.stack([t[name].detach() for t in tensors])
        for i, member in enumerate(tensors):
            member[name].data = rows[i]
        stacked[name] = rows
    return stacked


def _check_alike(models: Sequence[nn.Module]) -> None:
    """The members must have one structure: the same parameters and buffers, of the same shapes."""
    def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...], bool]]:
        return [(n, tuple(t.shape), t.requires_grad) for n, t in (*model.named_parameters(), *model.named_buffers())]

    first = layout(models[0])
    for i, model in enumerate(models[1:], 1):
        if layout(model) != first:
            raise ValueError(f"member {i} has other parameters or buffers than member 0: they cannot be stacked")
