"""A fused group's step captured once as a CUDA graph and replayed for every full batch.

A group of small models is launch-bound on a GPU: the 12 LeNets' wide step is about 180 kernels
(benchmarks/fused_step.py), each a few microseconds of the host's time for little work on the device.
A CUDA graph launches them all at once. The graph holds the members' forward and backward
(stacked.py), their losses, the fused optimizer's device ops (optim.py: FusedSteps.apply) and the
epoch's sums; the host keeps, each step: drawing the batch (copied into the graph's input), the members'
numbers (FusedSteps.prepare: each lr as its schedule has it, Adam's bias corrections) and their
schedules' steps. So each member steps exactly as in the eager fused step.

Taken on CUDA with one optimizer step for all members (FusedSteps), without dropout (a captured draw
would not be each member's own generator's) and in fp32 (autocast's weight cache cannot be captured);
elsewhere the group steps eagerly. The first WARMUP full batches of a part step eagerly on a side
stream (CUDA's lazy set-up must not happen inside a capture); a smaller batch (an epoch's last) steps
eagerly. Before the graph is trusted it is checked once: from the same state, a replay must write what
the captured function run eagerly writes (weights, gradients, optimizer state, norms' statistics, sums).
A capture that fails, or a check that does not agree, is said once in the log, and the group goes on
eagerly.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

from cnnlab.engine import EpochState
from cnnlab.fused.optim import FusedSteps, Updates
from cnnlab.fused.stacked import StackedModels

log = logging.getLogger("cnnlab")
WARMUP = 3  # eager full batches before the capture, as torch's docs do for whole-network capture

# one fused step into the given sums, its optimizer update the last argument: updates.step eagerly, or
# updates.apply, the device ops alone, where a graph holds it (steps.py: fused_epoch's step)
Body = Callable[[torch.Tensor, torch.Tensor, EpochState, Callable[[], None]], None]


def graphable(stacked: StackedModels, updates: Updates, device: torch.device, bf16: bool, streaming: bool) -> str | None:
    """Why this group's step is not captured, or None when it can be."""
    if device.type != "cuda":
        return "not on CUDA"
    if streaming:  # its pin-memory thread may use CUDA during a capture, which would break it
        return "the data streams through a DataLoader"
    if not isinstance(updates, FusedSteps):
        return "the members' optimizers step one by one"
    if updates.rule.host_state:  # a graph would not replay what a step changes there
        return "the optimizer keeps state on the host (Adam's step counts without fused=True)"
    if stacked.draws_dropout:
        return "its members draw dropout masks"
    return "trainer.precision=bf16" if bf16 else None


class GraphedSteps:
    """The group's full-batch steps through one captured graph, counted into static sums that are added to
    the epoch's at each flush (before any eager step, and at the epoch's end, so the first bad step stays
    the earliest). simulate: on any device, the captured function is called instead of a graph (tests)."""

    def __init__(self, stacked: StackedModels, updates: FusedSteps, n: int, device: torch.device,
                 simulate: bool = False) -> None:
        self.stacked, self.updates, self.device, self.simulate = stacked, updates, device, simulate
        self.sums = EpochState(None, 0.0, torch.zeros(n, device=device), torch.zeros(n, dtype=torch.long, device=device),
                               torch.full((n,), -1, dtype=torch.long, device=device),
                               torch.zeros((), dtype=torch.long, device=device))  # step: the batch's index in the epoch
        self.x = self.y = self.body = None  # the static input the graph reads, and the step (its losses' tensors)
        self.replay: Callable[[], None] | None = None
        self.warm, self.failed, self.counting = 0, False, False
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def step(self, x: torch.Tensor, y: torch.Tensor, sums: EpochState, body: Body) -> bool:
        """This full batch's step through the graph, counted into sums; False where the caller steps it eagerly."""
        if self.failed or (self.x is not None and (x.shape != self.x.shape or y.shape != self.y.shape)):
            return False
        if self.replay is None:
            if self.warm < WARMUP:
                with self._warming():
                    body(x, y, sums, self.updates.step)
                self.warm += 1
                return True
            self.flush(sums)
            if not (self._capture(x, y, body) and self._agrees()):
                self.failed, self.replay, self.x, self.y, self.body = True, None, None, None, None  # its memory goes
                return False
        if not self.counting:  # the first step after a flush: the sums start from the epoch's position
            self.sums.loss_sum.zero_()
            self.sums.correct.zero_()
            self.sums.first_nonfinite.fill_(-1)
            self.sums.step.fill_(sums.step)
            self.counting = True
        self.x.copy_(x)
        self.y.copy_(y)
        self.updates.prepare()  # once before and once after each replay: the host's part of the optimizer step
        self.replay()
        self.updates.after()
        sums.step += 1
        sums.seen += y.shape[-1]
        return True

    def flush(self, sums: EpochState) -> None:
        """The graph's counts since the last flush added to sums."""
        if not self.counting:
            return
        sums.loss_sum += self.sums.loss_sum
        sums.correct += self.sums.correct
        sums.first_nonfinite = torch.where(sums.first_nonfinite >= 0, sums.first_nonfinite, self.sums.first_nonfinite)
        self.counting = False

    def _captured(self) -> None:
        """The step the graph holds: the eager fused step on the static input, its optimizer's device ops alone."""
        self.body(self.x, self.y, self.sums, self.updates.apply)

    def _capture(self, x: torch.Tensor, y: torch.Tensor, body: Body) -> bool:
        # everything the graph reads is kept here: a tensor freed after the capture would be read from reused memory
        self.x, self.y, self.body = x.clone(), y.clone(), body
        self.updates.prepare()  # the columns the graph reads exist before it is captured (prepare again: the same)
        if self.simulate:
            self.replay = self._captured
        else:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._captured()
            except Exception as err:  # noqa: BLE001 - what cannot be captured steps eagerly
                log.warning("the fused step could not be captured as a CUDA graph (%s: %s); it steps eagerly",
                            type(err).__name__, (str(err).splitlines() or [""])[0][:300])
                return False
            self.replay = graph.replay
        return True

    def _agrees(self) -> bool:
        """The graph checked once before it is trusted: from the same state, one replay must write what the
        captured function run eagerly writes (weights, gradients, optimizer state, norms' statistics, sums),
        bitwise or to 1e-4 of each member's largest value (kernels with atomics). The state is put back after
        each. (What it cannot see: a value the capture baked in that changes only at later steps.)"""
        written = [self.stacked.flat.values, self.stacked.flat.grads, *self.stacked.buffers.values(),
                   *(t for t in vars(self.updates.rule).values() if isinstance(t, torch.Tensor)),
                   self.sums.loss_sum, self.sums.correct, self.sums.first_nonfinite, self.sums.step]
        try:
            before = [t.clone() for t in written]
            self._captured()
            eager = [t.clone() for t in written]
            for t, b in zip(written, before):
                t.copy_(b)
            self.replay()
            worst = max(_difference(a, b, len(self.sums.loss_sum)) for a, b in zip(written, eager))
            for t, b in zip(written, before):
                t.copy_(b)
        except Exception as err:  # noqa: BLE001 - out of memory for the copies, say: eager, as after a failed capture
            log.warning("the fused step captured as a CUDA graph could not be checked (%s: %s); it steps eagerly",
                        type(err).__name__, (str(err).splitlines() or [""])[0][:300])
            return False
        if worst > 1e-4:
            log.warning("the fused step captured as a CUDA graph did not step as it does eagerly (a relative "
                        "difference of %.2g); it steps eagerly", worst)
        return worst <= 1e-4

    @contextlib.contextmanager
    def _warming(self) -> Iterator[None]:
        if self.side is None:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self.side):
                yield
        finally:  # also after an error: what follows reads what the side stream wrote
            torch.cuda.current_stream(self.device).wait_stream(self.side)


def _difference(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """The largest difference of a from b, relative to the largest finite value of b's member (row, when the
    tensor is [n, ...]); 0 when bitwise equal; equal values (infinities too) and NaN in both count as equal."""
    if torch.equal(a, b):
        return 0.0
    rows = (lambda t: t.double().reshape(n, -1)) if a.dim() and a.shape[0] == n else (lambda t: t.double().reshape(1, -1))
    a, b = rows(a), rows(b)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    gap = torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=float("inf"), posinf=float("inf"))
    scale = torch.where(torch.isfinite(b), b.abs(), 0.0).amax(1, keepdim=True).clamp(min=1e-12)
    return float((gap / scale).max())
