"""One epoch of a fused group's steps, two ways over the same members:

    fused  one wide forward and backward for all members (stacked.py: its layers written out, or vmap),
           then one optimizer step for all (optim.py): what pays on a GPU, where small models are launch-bound
    loop   each member's own step in turn, as its lone run takes it: on a CPU, where fusing measured slower
           (benchmarks/results/fused_probe_cpu.md), the group still shares one process and its start-up

Either way each member draws its batches, augmentation and dropout from its own generators, so it sees
what its lone run sees; its losses and predictions are counted into its own EpochState.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from cnnlab.engine import EpochState, run_steps, settled
from cnnlab.fused.graph import GraphedSteps
from cnnlab.fused.optim import Updates
from cnnlab.fused.stacked import StackedModels
from cnnlab.losses import build_member_losses
from cnnlab.trainstate import TrainState


@dataclass
class Stepper:
    """The members that step together this epoch, their epoch states and their dropout generators."""

    states: Sequence[TrainState]
    epochs: Sequence[EpochState]
    generators: Sequence[torch.Generator]  # what the lone run's global RNG is to it: dropout draws
    stop: Callable[[], bool]


@contextlib.contextmanager
def member_rng(generator: torch.Generator) -> Iterator[None]:
    """The device's global RNG is the member's for a while: what a member's own code draws (dropout in its
    step, the doctor) comes from the member's stream, and its checkpoint saves that stream as the lone run's."""
    default = torch.default_generator if generator.device.type == "cpu" else \
        torch.cuda.default_generators[generator.device.index or 0]
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


def loop_epoch(step: Stepper) -> list[float]:
    """Each member's epoch in turn, with its own steps as alone (one model's weights stay in cache while it
    steps); the seconds each took. After a signal the members not yet begun keep their epoch at its start,
    checkpointed there."""
    seconds = []
    for s, state, generator in zip(step.states, step.epochs, step.generators):
        tic = time.perf_counter()
        if not step.stop():
            with member_rng(generator):
                run_steps(s.step_model, s.batches, s.ctx, s.optimizer, s.scheduler, state, None, step.stop,
                          s.run.trainer.grad_clip)
        seconds.append(settled(s.device) - tic)
    return seconds


def fused_epoch(step: Stepper, stacked: StackedModels, updates: Updates, graph: GraphedSteps | None = None) -> None:
    """One fused forward and backward per batch for all members (wide or vmap: stacked.py), then one
    optimizer step for all (optim.py); with graph, full batches replay it as a captured CUDA graph (graph.py).
    Members that draw the same batches (one dataset, one seed, one position) draw them once; losses and
    counters are batched over the members: a step's Python and kernel launches hardly grow with N."""
    stacked.train()
    ctx = step.states[0].ctx  # members share device and precision: the group's rule
    streams = _streams(step)
    losses_of = _Losses(step.states, ctx.device)
    sums = _together(step.epochs)
    full = step.states[0].run.trainer.batch_size  # a graph is captured and replayed for full batches alone

    def one(x: torch.Tensor, y: torch.Tensor, sums: EpochState, update: Callable[[], None] = updates.step) -> None:
        """One step into sums: eagerly, or (update: the optimizer's device ops alone) as a graph holds it."""
        with ctx.autocast():
            logits = stacked.forward(x, step.generators, batched_input=streams.batched)
            losses = losses_of(logits, y, streams.batched)
        stacked.zero_grad()
        stacked.flat.backward(losses.sum())  # each member's gradient is its own loss's: the others' do not reach it
        update()
        sums.count(losses, logits, y)

    try:
        for draws in zip(*(step.states[j].batches.take(step.epochs[j].order, step.epochs[j].step) for j in streams.leaders)):
            if step.stop():  # checked before a step: a part a signal finds not yet begun takes none
                break
            x, y = streams.inputs(step, draws)
            if graph is not None and y.shape[-1] == full and graph.step(x, y, sums, one):
                continue
            if graph is not None:
                graph.flush(sums)  # the graph's steps counted before this one's
            one(x, y, sums)
    finally:
        if graph is not None:
            graph.flush(sums)
        _apart(sums, step.epochs)
        streams.share_generators(step)


@dataclass
class _Streams:
    """Which members draw their own batches (leaders) and whose draws each member takes. Members on one
    dataset whose generators stand alike draw alike; their generators are brought level after the epoch."""

    leaders: list[int]
    of_member: list[int]  # the index, in leaders, of the stream each member takes
    pick: torch.Tensor  # of_member on the device, made once: not an upload every step

    @property
    def batched(self) -> bool:
        return len(self.leaders) > 1

    def inputs(self, step: Stepper, draws: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' inputs and labels: one batch for all ([B, ...]), or one per member ([N, B, ...])."""
        xs = [step.states[j].ctx.inputs(images, train=True) for j, (images, _) in zip(self.leaders, draws)]
        if not self.batched:
            return xs[0], draws[0][1]
        return torch.stack(xs)[self.pick], torch.stack([labels for _, labels in draws])[self.pick]

    def share_generators(self, step: Stepper) -> None:
        for member, stream in enumerate(self.of_member):
            leader = self.leaders[stream]
            if member != leader:
                step.states[member].generator.set_state(step.states[leader].generator.get_state())


def _streams(step: Stepper) -> _Streams:
    leaders: list[int] = []
    of_member = []
    for i, (s, e) in enumerate(zip(step.states, step.epochs)):
        same = [k for k, j in enumerate(leaders) if _draws_alike(s, e, step.states[j], step.epochs[j])]
        of_member.append(same[0] if same else len(leaders))
        if not same:
            leaders.append(i)
    return _Streams(leaders, of_member, torch.tensor(of_member, device=step.states[0].device))


def _draws_alike(a: TrainState, ea: EpochState, b: TrainState, eb: EpochState) -> bool:
    orders = (ea.order is None and eb.order is None) or (
        ea.order is not None and eb.order is not None and torch.equal(ea.order, eb.order))
    return (a.data is b.data and ea.step == eb.step and orders
            and torch.equal(a.generator.get_state(), b.generator.get_state()))


class _Losses:
    """Each member's own loss, one call per distinct loss config (losses.build_member_losses): [N] losses in
    member order."""

    def __init__(self, states: Sequence[TrainState], device: torch.device) -> None:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(repr(s.run.loss), []).append(i)
        self.groups = [(build_member_losses(states[idx[0]].run.loss, states[idx[0]].spec.num_classes), idx)
                       for idx in groups.values()]
        order = [i for _, idx in self.groups for i in idx]
        self.inverse = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=device)
        self.index = [torch.tensor(idx, device=device) for _, idx in self.groups]

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, batched: bool) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0][0](logits, y)
        parts = [fn(logits[idx], y[idx] if batched else y) for (fn, _), idx in zip(self.groups, self.index)]
        return torch.cat(parts)[self.inverse]


def _together(epochs: Sequence[EpochState]) -> EpochState:
    """The members' epoch states as one, its sums [N] tensors (a part's members stand at one position)."""
    first = epochs[0]
    return EpochState(None, first.lr, torch.stack([e.loss_sum for e in epochs]), torch.stack([e.correct for e in epochs]),
                      torch.stack([e.first_nonfinite for e in epochs]), first.step, first.seen)


def _apart(together: EpochState, epochs: Sequence[EpochState]) -> None:
    for i, e in enumerate(epochs):
        e.loss_sum, e.correct = together.loss_sum[i].clone(), together.correct[i].clone()
        e.first_nonfinite, e.step, e.seen = together.first_nonfinite[i].clone(), together.step, together.seen
