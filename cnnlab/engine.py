"""The step engine: training steps and evaluation on batches already on the device.

Loss and accuracy accumulate in device tensors and are read back once per epoch; augmentation
runs per sample but in whole batches on the device (StepContext.inputs). No PIL and no
per-sample Python in the hot loop. Nothing here knows about configs, files or run directories:
fit.py, the doctor and inference all build a StepContext (build.py) and call in here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cnnlab import distributed
from cnnlab.data.augment import Pipeline
from cnnlab.data.batches import AnySplit, Batches, StreamingBatches, batches_of
from cnnlab.losses import LossFn


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...


@dataclass
class StepContext:
    """What train and eval steps share: the input pipeline, loss, precision and layout."""

    pipeline: Pipeline
    loss_fn: LossFn
    device: torch.device
    bf16: bool
    channels_last: bool
    generator: torch.Generator | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = self.pipeline(images, train=train, generator=self.generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class EpochState:
    """How far one training epoch got. An interrupt checkpoint saves it, so a resume continues
    the same epoch at the next batch, with the same order and the same running sums."""

    order: torch.Tensor | None  # this epoch's sample order
    lr: float  # at the start of the epoch: metrics.csv's lr
    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_nonfinite: torch.Tensor  # the epoch's first step whose loss was NaN/inf; -1 while none
    step: int = 0  # batches done
    seen: int = 0
    seconds: float = 0.0  # training time spent in this epoch so far

    @classmethod
    def begin(cls, batches: Batches | StreamingBatches, optimizer: torch.optim.Optimizer,
              device: torch.device) -> EpochState:
        return cls(
            order=batches.order(), lr=optimizer.param_groups[0]["lr"],
            loss_sum=torch.zeros((), device=device), correct=torch.zeros((), dtype=torch.long, device=device),
            first_nonfinite=torch.full((), -1, dtype=torch.long, device=device),
        )

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> EpochState:
        return cls(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()})

    def reduce(self) -> None:
        """Under torchrun: the totals over all ranks, on every rank (the first bad step: the earliest)."""
        if not distributed.active():
            return
        seen = torch.tensor(self.seen, device=self.loss_sum.device)
        distributed.all_sum(self.loss_sum, self.correct, seen)
        self.seen = int(seen.item())
        bad = torch.where(self.first_nonfinite < 0, torch.iinfo(torch.long).max, self.first_nonfinite)
        distributed.all_min(bad)
        self.first_nonfinite = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)

    def forget_sums(self) -> None:
        """Under torchrun a checkpoint holds the sums over all ranks: only rank 0 keeps them on resume."""
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0

    def count(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step's loss and predictions into the epoch's sums. Also for N runs at once (a fused group's):
        loss [N], logits [N, B, K], labels [N, B] or [B], with the sums [N] tensors."""
        loss = loss.detach()
        # remembered on the device: checking each step on the host would sync every step; in place, and with
        # step a device tensor, a captured step (fused/graph.py) counts as this does
        bad = (self.first_nonfinite < 0) & ~torch.isfinite(loss)
        self.first_nonfinite.copy_(torch.where(bad, self.step, self.first_nonfinite))
        self.loss_sum += loss * labels.shape[-1]
        self.correct += (logits.argmax(-1) == labels).sum(-1)
        self.seen += labels.shape[-1]
        self.step += 1

    def results(self) -> tuple[float, float, int]:
        """(mean loss, accuracy, images seen): the epoch's one host sync."""
        return self.loss_sum.item() / self.seen, self.correct.item() / self.seen, self.seen


def settled(device: torch.device) -> float:
    """time.perf_counter() once the device has run what was queued: a CUDA step returns before its kernels do,
    and a captured step (one launch) lets the host run many steps ahead, so the steps' time would be short."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_steps(
    model: torch.nn.Module,
    batches: Batches | StreamingBatches,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: EpochState,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    grad_clip: float | None = None,
) -> EpochState:
    """Train from state.step to the end of the epoch, or until stop() says so after a step."""
    model.train()
    for images, labels in batches.take(state.order, state.step):
        train_step(model, images, labels, ctx, optimizer, scheduler, state, grad_clip)
        if progress is not None:
            progress.update(1)
        if stop is not None and stop():
            break
    return state


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, state: EpochState,
               grad_clip: float | None = None) -> None:
    """One training step on one batch, counted into the epoch's state."""
    x = ctx.inputs(images, train=True)
    with ctx.autocast():
        logits = model(x)
        loss = ctx.loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    update(model.parameters(), optimizer, scheduler, grad_clip)
    state.count(loss, logits, labels)


def update(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float | None) -> None:
    """What follows the backward pass: clip the gradients, step the optimizer and the schedule."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()


def train_one_epoch(
    model: torch.nn.Module,
    batches: Batches | StreamingBatches,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress | None = None,
) -> tuple[float, float, int]:
    """One whole pass over the training split; returns (mean loss, accuracy, images seen)."""
    state = EpochState.begin(batches, optimizer, ctx.device)
    return run_steps(model, batches, ctx, optimizer, scheduler, state, progress).results()


@dataclass
class Evaluation:
    loss: float
    acc: float
    confusion: np.ndarray  # [true, predicted] counts


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: AnySplit, ctx: StepContext, batch_size: int, num_classes: int,
             num_workers: int = 0) -> Evaluation:
    """Loss, accuracy and confusion matrix of a split. Under torchrun each rank passes its shard
    and gets the totals over all ranks."""
    model.eval()
    k = num_classes
    loss_sum = torch.zeros((), device=ctx.device)
    counts = torch.zeros(k * k, dtype=torch.long, device=ctx.device)
    for images, labels in batches_of(split, batch_size, ctx.device, num_workers):
        with ctx.autocast():
            logits = model(ctx.inputs(images, train=False))
        loss_sum += ctx.loss_fn(logits, labels) * len(labels)
        counts += torch.bincount(labels * k + logits.argmax(1), minlength=k * k)
    distributed.all_sum(loss_sum, counts)
    confusion = counts.view(k, k).cpu().numpy()
    n = max(int(confusion.sum()), 1)
    return Evaluation(loss_sum.item() / n, float(np.trace(confusion)) / n, confusion)
