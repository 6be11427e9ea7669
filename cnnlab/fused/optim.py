"""What follows a fused group's backward: one optimizer step for all members, as HFTA fuses its optimizers.

The members' parameters and gradients are one [N, D] buffer each (flat.py), so SGD and Adam/AdamW step
every member and every parameter with a handful of whole-buffer ops. Each member's hyperparameters
(lr as its schedule has it, momentum, betas, eps, weight decay, nesterov) are an [N, 1] column that
broadcasts over the rows, made on the host and uploaded only when they change; gradient clipping
(trainer.grad_clip) uses each member's own norm. The math is torch's own step's (torch/optim/sgd.py's
multi-tensor path; adam.py's, its last update in the capturable path's form), so a member steps as its
lone run does up to rounding.

Each member's optimizer keeps its state: its momentum buffers and Adam moments are rows of the fused
buffers and its step counts entries of one tensor, so its checkpoint holds exactly what its own
optimizer's would, and resumes alone. Its schedule steps as alone and sets the lr the next step reads.

Other optimizers (RAdam, RMSprop, one with settings the rules here do not follow), members at different
Adam steps and a model with a parameter its forward never uses step per member: each member's own
optimizer on its rows (MemberSteps).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from cnnlab.engine import update
from cnnlab.fused.flat import FlatParams
from cnnlab.trainstate import TrainState


class Updates(Protocol):
    def step(self) -> None: ...
    def release(self) -> None: ...


def member_updates(flat: FlatParams, states: Sequence[TrainState], unused: Sequence[str] = ()) -> Updates:
    """One fused step where every member's optimizer is an SGD or Adam(W) the rules here follow; else each
    member's own step. unused: parameters the forward does not use; alone they get no gradient, so their
    optimizer leaves them be (no weight decay, no momentum), which only the members' own steps follow."""
    kind = type(states[0].optimizer)
    rule = RULES.get(kind)
    if rule is not None and not unused and all(type(s.optimizer) is kind and _follows(s, flat) for s in states):
        with contextlib.suppress(ValueError):  # members the rule cannot take as one (it checks before it changes any)
            return FusedSteps(flat, states, rule)
    for s in states:
        for name in unused:
            s.model.get_parameter(name).grad = None
    return MemberSteps(states)


class MemberSteps:
    """Each member's own optimizer and schedule step, on the rows its parameters view."""

    def __init__(self, states: Sequence[TrainState]) -> None:
        self.states = states

    def step(self) -> None:
        for s in self.states:
            update(s.model.parameters(), s.optimizer, s.scheduler, s.run.trainer.grad_clip)

    def release(self) -> None:
        pass


class Columns:
    """Per-member numbers as [N, 1] tensors on the device, each uploaded only when its numbers change, into
    the same tensor (a captured step, fused/graph.py, reads it where it was). On CUDA they go up from pinned
    memory without blocking: a step never waits for the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.made: dict[str, tuple[list[float], torch.Tensor]] = {}

    def set(self, key: str, numbers: list[float]) -> None:
        made = self.made.get(key)
        if made is not None and made[0] == numbers:
            return
        column = torch.tensor(numbers, dtype=torch.float32).unsqueeze(1)
        if self.device.type == "cuda":
            column = column.pin_memory()
        if made is None:
            self.made[key] = (list(numbers), column.to(self.device))
        else:
            made[1].copy_(column, non_blocking=True)
            self.made[key] = (list(numbers), made[1])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.made[key][1]


class FusedSteps:
    """One optimizer step for all members over the flat buffers, then each member's schedule step."""

    def __init__(self, flat: FlatParams, states: Sequence[TrainState], rule: type[Rule]) -> None:
        self.flat, self.states = flat, states
        self.optimizers = [s.optimizer for s in states]
        self.columns = Columns(flat.values.device)
        self.clip = states[0].run.trainer.grad_clip  # a trainer setting: the same for the whole group
        members = [_named(s, flat) for s in states]
        self.rule = rule(flat, [o.param_groups[0] for o in self.optimizers], [o.state for o in self.optimizers], members)
        for o in self.optimizers:
            o._opt_called = True  # noqa: SLF001 - the member's schedule checks its optimizer stepped, and it has

    def step(self) -> None:
        self.prepare()
        self.apply()
        self.after()

    def prepare(self) -> None:
        """The host's part before the step: the members' numbers (lr as each schedule has it) to the device."""
        self.rule.prepare([o.param_groups[0]["lr"] for o in self.optimizers], self.columns)

    def apply(self) -> None:
        """The device's part: ops on the flat buffers and the columns alone (a CUDA graph can hold them)."""
        grads = self.flat.grads
        if self.clip:  # torch.nn.utils.clip_grad_norm_, each member by its own norm
            norms = grads.norm(dim=1, keepdim=True)
            grads.mul_((self.clip / (norms + 1e-6)).clamp_(max=1.0))
        with torch.no_grad():
            self.rule.apply(self.flat.values, grads, self.columns)

    def after(self) -> None:
        """The host's part after the step: the rule's count, each member's schedule."""
        self.rule.advance()
        for s in self.states:
            s.scheduler.step()

    def release(self) -> None:
        """The members' optimizer states in storage of their own, so the fused buffers can go."""
        for o in self.optimizers:
            for state in o.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = value.clone()


class Rule:
    """One optimizer's math over the flat buffers, with the members' states as views of the rule's buffers.
    groups: each member's one param group; states: each member's optimizer.state; members: each member's
    parameters by name."""

    host_state = False  # state a step changes on the host (which a captured CUDA graph would not replay)

    def __init__(self, flat: FlatParams, groups: list[dict[str, Any]], states: list[dict], members: list[dict]) -> None:
        self.flat, self.groups = flat, groups

    def numbers(self, key: str) -> list[float]:
        return [float(g[key]) for g in self.groups]

    def buffer(self, key: str, states: list[dict], members: list[dict], own: Sequence[bool] | None = None) -> torch.Tensor:
        """A zero buffer shaped like the parameters whose rows become members' state[key]: where a member has
        that state already (a resumed run), its values are copied in first. own: which members keep it."""
        buffer = torch.zeros_like(self.flat.values)
        for i, (state, params) in enumerate(zip(states, members)):
            if own is not None and not own[i]:
                continue
            for name, p in params.items():
                row = self.flat.row(buffer, name, i)
                if key in state.get(p, {}):
                    row.copy_(state[p][key])
                state.setdefault(p, {})[key] = row
        return buffer

    def prepare(self, lrs: list[float], columns: Columns) -> None:
        """The next step's per-member numbers into columns (host work, before the step; again, the same)."""
        raise NotImplementedError

    def advance(self) -> None:
        """After a step: what the rule counts on the host."""

    def apply(self, values: torch.Tensor, grads: torch.Tensor, columns: Columns) -> None:
        """The step: device ops alone, reading the columns prepare set."""
        raise NotImplementedError


class SGDRule(Rule):
    """torch.optim.SGD (dampening 0): weight decay, momentum buffer, nesterov, then p -= lr * d."""

    def __init__(self, flat: FlatParams, groups: list[dict[str, Any]], states: list[dict], members: list[dict]) -> None:
        super().__init__(flat, groups, states, members)
        self.decay, self.momentum = self.numbers("weight_decay"), self.numbers("momentum")
        self.nesterov = self.numbers("nesterov")
        # a member without momentum keeps no buffer, as alone; its row here is its gradient each step
        own = [m != 0 for m in self.momentum]
        self.buf = self.buffer("momentum_buffer", states, members, own) if any(own) else None

    def prepare(self, lrs: list[float], columns: Columns) -> None:
        columns.set("decay", self.decay)
        columns.set("momentum", self.momentum)
        columns.set("nesterov", self.nesterov)
        columns.set("-lr", [-lr for lr in lrs])

    def apply(self, values: torch.Tensor, grads: torch.Tensor, columns: Columns) -> None:
        d = torch.addcmul(grads, values, columns["decay"]) if any(self.decay) else grads
        if self.buf is not None:  # a first step's buffer is the gradient, here as 0 * m + g
            momentum = columns["momentum"]
            self.buf.mul_(momentum).add_(d)
            if all(self.nesterov):
                d = torch.addcmul(d, self.buf, momentum)
            elif any(self.nesterov):
                d = torch.where(columns["nesterov"] > 0, torch.addcmul(d, self.buf, momentum), self.buf)
            else:
                d = self.buf
        values.addcmul_(d, columns["-lr"])


class AdamRule(Rule):
    """torch.optim.Adam and AdamW (no amsgrad): moments, bias corrections from each member's step count, and
    weight decay into the gradient (Adam) or onto the weights (AdamW)."""

    def __init__(self, flat: FlatParams, groups: list[dict[str, Any]], states: list[dict], members: list[dict]) -> None:
        super().__init__(flat, groups, states, members)
        self.beta1, self.beta2 = [float(g["betas"][0]) for g in groups], [float(g["betas"][1]) for g in groups]
        self.eps, self.decay = self.numbers("eps"), self.numbers("weight_decay")
        self.decoupled = bool(groups[0].get("decoupled_weight_decay", False))
        self.steps, self.t = self._steps(groups, states, members)
        self.exp_avg = self.buffer("exp_avg", states, members)
        self.exp_avg_sq = self.buffer("exp_avg_sq", states, members)

    def _steps(self, groups: list[dict[str, Any]], states: list[dict], members: list[dict]) -> tuple[torch.Tensor, int]:
        """Every member's step counts as entries of one [N, params] tensor, where its own optimizer keeps them
        (on the device for a fused or capturable Adam, else on the CPU); and the count they share. Raises
        ValueError, before any state is changed, where the members stand at different steps."""
        on_device = groups[0].get("fused") or groups[0].get("capturable")
        self.host_state = not on_device
        device = self.flat.values.device if on_device else torch.device("cpu")
        steps = torch.zeros(len(members), len(self.flat.names), dtype=torch.float32, device=device)
        for i, (state, params) in enumerate(zip(states, members)):
            for k, p in enumerate(params.values()):
                if "step" in state.get(p, {}):
                    steps[i, k] = state[p]["step"]
        counts = steps.unique().tolist()  # one read at build, none per step
        if len(counts) > 1:
            raise ValueError(f"the members stand at different Adam steps {counts}")
        for i, (state, params) in enumerate(zip(states, members)):
            for k, p in enumerate(params.values()):
                state.setdefault(p, {})["step"] = steps[i, k]
        return steps, int(counts[0]) if counts else 0

    def prepare(self, lrs: list[float], columns: Columns) -> None:
        t = self.t + 1  # the step about to be taken
        columns.set("1-lr*wd", [1 - lr * wd for lr, wd in zip(lrs, self.decay)])
        columns.set("decay", self.decay)
        columns.set("1-beta1", [1 - b for b in self.beta1])
        columns.set("beta2", self.beta2)
        columns.set("1-beta2", [1 - b for b in self.beta2])
        # in double on the host, as torch's step computes them from its step count
        columns.set("step size", [-(lr / (1 - b ** t)) for lr, b in zip(lrs, self.beta1)])
        columns.set("sqrt(1-beta2^t)", [(1 - b ** t) ** 0.5 for b in self.beta2])
        columns.set("eps", self.eps)

    def advance(self) -> None:
        self.t += 1

    def apply(self, values: torch.Tensor, grads: torch.Tensor, columns: Columns) -> None:
        self.steps.add_(1)
        g = grads
        if any(self.decay) and self.decoupled:
            values.mul_(columns["1-lr*wd"])
        elif any(self.decay):
            g = torch.addcmul(grads, values, columns["decay"])
        self.exp_avg.lerp_(g, columns["1-beta1"])
        self.exp_avg_sq.mul_(columns["beta2"]).addcmul_(g, g * columns["1-beta2"])
        # torch's capturable form, p += m / ((sqrt(v) / sqrt(1 - beta2^t) + eps) / -step_size): one temporary
        # buffer, not three
        denom = self.exp_avg_sq.sqrt().div_(columns["sqrt(1-beta2^t)"]).add_(columns["eps"])
        values.addcdiv_(self.exp_avg, denom.div_(columns["step size"]))


RULES: dict[type[torch.optim.Optimizer], type[Rule]] = {
    torch.optim.SGD: SGDRule,
    torch.optim.Adam: AdamRule,
    torch.optim.AdamW: AdamRule,
}
# group settings the rules assume (torch's defaults, and cnnlab's: it sets none of them)
_PLAIN = {"dampening": 0, "maximize": False, "amsgrad": False, "differentiable": False}


def _follows(state: TrainState, flat: FlatParams) -> bool:
    """One param group, plain settings, and every trainable parameter of the member in it."""
    if len(state.optimizer.param_groups) != 1:
        return False
    group = state.optimizer.param_groups[0]
    plain = all(group.get(k, v) == v for k, v in _PLAIN.items())
    return plain and not isinstance(group["lr"], torch.Tensor) and len(_named(state, flat)) == len(flat.names)


def _named(state: TrainState, flat: FlatParams) -> dict[str, torch.Tensor]:
    """The member's trainable parameters its optimizer holds, by name, in the flat order."""
    held = {id(p) for p in state.optimizer.param_groups[0]["params"]}
    named = dict(state.model.named_parameters())
    return {name: named[name] for name in flat.names if id(named[name]) in held}
