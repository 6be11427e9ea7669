"""fit / train_one_epoch / evaluate, on data resident on the training device.

Each split is moved to the device once as a uint8 tensor. An epoch is a randperm over it;
augmentation runs per sample but in whole batches on the device; loss and accuracy accumulate
in device tensors and are read back once per epoch. No PIL, no DataLoader workers, no
per-sample Python in the hot loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import cnnlab
from cnnlab import doctor, report, viz
from cnnlab.checkpoint import atomic_write_text, load_checkpoint, restore_rng, rng_state, save_checkpoint
from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig
from cnnlab.data import DatasetSpec, Split, load_dataset, spec_for
from cnnlab.data.datasets import FileSplit
from cnnlab import distributed
from cnnlab.distributed import World, world_from_env
from cnnlab.data.augment import Pipeline, build_pipeline
from cnnlab.losses import LossFn, build_loss
from cnnlab.models import build_model
from cnnlab.models.card import human, model_card
from cnnlab.interrupt import GracefulStop, Interrupted
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.resume import check_epochs, resume_point, trim_metrics
from cnnlab.trackers import Trackers, open_trackers

log = logging.getLogger("cnnlab")
PROGRESS_DELAY_S = 2.0  # an epoch shorter than this shows no bar at all: no flicker on quick runs


def select_device(name: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    elif (name == "cuda" and not cuda) or (name == "mps" and not mps):
        found = ", ".join(["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else []))
        raise ConfigError(f"trainer.device={name} but torch sees no {name} device here; available: {found} (or auto)")
    # cuda:<index>, not bare cuda, so summary.json says which GPU a job of a parallel sweep had
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class Batches:
    """Mini-batches of a device-resident split; a fresh randperm each epoch when shuffling."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int  # the global batch: under torchrun each rank takes its slice of it
    shuffle: bool = False
    # Training drops the ragged last batch (a batch of 1 breaks BatchNorm, and fixed shapes
    # keep compiled graphs stable) unless the split is smaller than one batch.
    drop_last: bool = False
    generator: torch.Generator | None = None
    world: World = World()

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor | None:
        """This epoch's sample order: a fresh randperm when shuffling, None for the stored order.
        Every rank draws the same order from its identically seeded generator."""
        if not self.shuffle:
            return None
        return torch.randperm(len(self.labels), device=self.labels.device, generator=self.generator)

    def indices(self, order: torch.Tensor | None, start: int = 0) -> Iterator[torch.Tensor | slice]:
        """This rank's sample indices of each batch from batch `start` on (a resumed epoch skips those done)."""
        for i in range(start, len(self)):
            span = slice(i * self.batch_size, min((i + 1) * self.batch_size, len(self.labels)))
            if not self.world.distributed:
                yield span if order is None else order[span]
                continue
            idx = torch.arange(span.start, span.stop, device=self.labels.device) if order is None else order[span]
            yield idx.tensor_split(self.world.size)[self.world.rank]

    def take(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (images, labels) batches of one epoch in `order`, from batch `start` on."""
        for idx in self.indices(order, start):
            yield self.images[idx], self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.take(self.order())


class _IndexedBatches(torch.utils.data.Dataset):
    """A DataLoader dataset whose items are whole batches: the sampler yields index tensors."""

    def __init__(self, split: Split | FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.split, FileSplit):  # decoded here, in a worker process
            return torch.stack([self.split[i] for i in index.tolist()]), self.split.labels[index]
        return self.split.images[index], self.split.labels[index]


class StreamingBatches(Batches):
    """The same batches as Batches, but read from host memory or image files by DataLoader
    workers and copied to the device batch by batch: for data larger than device memory.

    Sample order, sharding and the on-device augmentation are those of the resident path, so a
    run gives the same batches either way (tested)."""

    def __init__(self, split: Split | FileSplit, batch_size: int, device: torch.device, num_workers: int,
                 shuffle: bool = False, drop_last: bool = False, generator: torch.Generator | None = None,
                 world: World = World()) -> None:
        super().__init__(torch.empty(0), split.labels, batch_size, shuffle, drop_last, generator, world)
        self.split, self.device, self.num_workers = split, device, num_workers

    def order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        # drawn where the resident path draws it (the generator's device), so both give one order
        return torch.randperm(len(self.labels), device=self.generator.device, generator=self.generator)

    def take(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = None if order is None else order.cpu()  # one sync per epoch, for the sampler
        # self.labels live on the CPU here, so every index is a CPU tensor the workers can use
        indices = [torch.arange(i.start, i.stop) if isinstance(i, slice) else i for i in self.indices(order, start)]
        if not indices:
            return
        loader = torch.utils.data.DataLoader(
            _IndexedBatches(self.split), sampler=indices, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


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
    def begin(cls, batches: Batches, optimizer: torch.optim.Optimizer, device: torch.device) -> EpochState:
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

    def results(self) -> tuple[float, float, int]:
        """(mean loss, accuracy, images seen): the epoch's one host sync."""
        return self.loss_sum.item() / self.seen, self.correct.item() / self.seen, self.seen


def run_steps(
    model: torch.nn.Module,
    batches: Batches,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: EpochState,
    progress: tqdm | None = None,
    stop: Callable[[], bool] | None = None,
    grad_clip: float | None = None,
) -> EpochState:
    """Train from state.step to the end of the epoch, or until stop() says so after a step."""
    model.train()
    for images, labels in batches.take(state.order, state.step):
        x = ctx.inputs(images, train=True)
        with ctx.autocast():
            logits = model(x)
            loss = ctx.loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        # remembered on the device: checking each step on the host would sync every step
        state.first_nonfinite = torch.where((state.first_nonfinite < 0) & ~torch.isfinite(loss),
                                            state.step, state.first_nonfinite)
        state.loss_sum += loss * len(labels)
        state.correct += (logits.argmax(1) == labels).sum()
        state.seen += len(labels)
        state.step += 1
        if progress is not None:
            progress.update(1)
        if stop is not None and stop():
            break
    return state


def train_one_epoch(
    model: torch.nn.Module,
    batches: Batches,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: tqdm | None = None,
) -> tuple[float, float, int]:
    """One whole pass over the training split; returns (mean loss, accuracy, images seen)."""
    state = EpochState.begin(batches, optimizer, ctx.device)
    return run_steps(model, batches, ctx, optimizer, scheduler, state, progress).results()


@dataclass
class Evaluation:
    loss: float
    acc: float
    confusion: np.ndarray  # [true, predicted] counts


def batches_of(split: Split | FileSplit, batch_size: int, device: torch.device, num_workers: int = 0) -> Batches:
    """Evaluation batches in stored order: read in place when the split is on `device`, else streamed."""
    if isinstance(split, Split) and split.images.device == device:
        return Batches(split.images, split.labels, batch_size)
    return StreamingBatches(split, batch_size, device, num_workers)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split | FileSplit, ctx: StepContext, batch_size: int, num_classes: int,
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


@dataclass
class Prepared:
    """Everything decided from the config alone, before any data is loaded."""

    device: torch.device
    spec: DatasetSpec
    pipeline: Pipeline
    model: torch.nn.Module
    viz_layer: str | None  # the conv layer whose feature maps are drawn, if asked for


def prepare(run: RunConfig, spec: DatasetSpec | None = None) -> Prepared:
    """Config-time checks that need the dataset's shape: pipeline and model build, device.

    spec: the dataset's shape and classes when known already (a checkpoint records them, so a
    trained model opens without its image folder); by default read from the dataset config."""
    device = select_device(run.trainer.device)
    spec = spec or spec_for(run.dataset)
    pipeline = build_pipeline(run.augmentation, spec)
    channels, height, width = pipeline.output_shape
    seed_everything(run.trainer.seed)  # the model's initial weights depend on the seed alone
    model = build_model(run.model, channels, spec.num_classes, (height, width))
    viz_layer = viz.resolve_layer(model, run.viz.layer) if run.viz.feature_maps else None
    return Prepared(device, spec, pipeline, model, viz_layer)


# Resident data may take this share of the device's free memory; the rest is for the model,
# activations and optimizer state.
RESIDENT_FRACTION = 0.5


def _nbytes(split: Split | FileSplit | None) -> int:
    if split is None:
        return 0
    if isinstance(split, FileSplit):
        return len(split) * split.channels * split.size[0] * split.size[1]
    return split.images.numel() * split.images.element_size()


def _free_memory(device: torch.device) -> float:
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


def choose_loader(choice: str, splits: list[Split | FileSplit | None], device: torch.device) -> str:
    """dataset.loader=auto: resident when the uint8 splits fit in RESIDENT_FRACTION of the
    device's free memory, else streaming. Tensors already in RAM on a CPU run stay resident."""
    if choice != "auto":
        return choice
    if device.type == "cpu" and all(s is None or isinstance(s, Split) for s in splits):
        return "resident"
    need, free = sum(_nbytes(s) for s in splits), _free_memory(device)
    loader = "resident" if need <= RESIDENT_FRACTION * free else "streaming"
    log.info("dataset.loader=auto: %s (the data is %.2f GB as uint8, %.2f GB free on %s)", loader, need / 1e9,
             free / 1e9, device)
    return loader


def stream_workers(num_workers: int | None, split: Split | FileSplit) -> int:
    """dataset.num_workers, or when null: worker processes to decode image files (min(8, cores)),
    none for tensors already in memory, where a batch is one indexed copy that workers would only
    pass through shared memory (measured on 2 CPU cores: as fast as resident without workers,
    half as fast with 2)."""
    if num_workers is not None:
        return num_workers
    return min(8, os.cpu_count() or 1) if isinstance(split, FileSplit) else 0


def _resident(split: Split | FileSplit | None, device: torch.device) -> Split | None:
    if split is None:
        return None
    split = split.load() if isinstance(split, FileSplit) else split
    return Split(split.images.to(device), split.labels.to(device))


def _head(split: Split | FileSplit, n: int, device: torch.device) -> Split:
    """The first n examples on the device: the doctor's probe batch, feature-map panels."""
    part = split.head(n) if isinstance(split, FileSplit) else Split(split.images[:n], split.labels[:n])
    return part.to(device)


def _shard(split: Split | FileSplit | None, world: World) -> Split | FileSplit | None:
    """This rank's contiguous share of an evaluation split."""
    if split is None or not world.distributed:
        return split
    index = torch.arange(len(split)).tensor_split(world.size)[world.rank]
    if isinstance(split, FileSplit):
        return split.take(index)
    index = index.to(split.labels.device)
    return Split(split.images[index], split.labels[index])


def configure_determinism(deterministic: bool) -> None:
    """trainer.deterministic: bitwise-repeatable runs; on CUDA at some cost in speed."""
    torch.backends.cudnn.benchmark = not deterministic  # autotuned conv kernels may differ run to run
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.backends.cudnn.deterministic = True
        # warn_only: CUDA bincount (confusion counts) has no deterministic kernel, yet integer counts
        # are exact whatever the order; everything that has one uses it
        torch.use_deterministic_algorithms(True, warn_only=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fit(run: RunConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one run, or continue it with trainer.resume, writing every file of the run-directory contract.

    Returns the summary. A resume that fails before training starts leaves the run's
    summary.json as it was; any other failure is recorded in it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "status": "running",
        "model": run.model.name,
        "dataset": run.dataset.name,
        "overrides": list(overrides or []),
        "started_at": _now(),
        "cnnlab_version": cnnlab.__version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
    }
    if run.trainer.resume:
        previous = run_dir / "summary.json"
        summary = {**(json.loads(previous.read_text()) if previous.is_file() else summary), "status": "resuming"}
    main = world_from_env().is_main  # under torchrun only rank 0 writes files
    trackers = open_trackers(run, run_dir, summary) if main else Trackers()
    try:
        # signals are caught from the start, so one that comes during set-up also stops cleanly at the first step
        with GracefulStop() as stop:
            return _fit(run, run_dir, summary, list(overrides or []), stop, trackers)
    except Interrupted:
        raise  # _fit checkpointed and recorded where
    except KeyboardInterrupt:
        summary.update(status="interrupted")
        raise
    except BaseException as err:
        if summary["status"] != "resuming":
            summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if summary["status"] != "resuming" and main:
            summary["finished_at"] = _now()
            report.write_summary(run_dir, summary)
        trackers.close(summary, run_dir)


def _restore(path: Path, run: RunConfig, device: torch.device, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
             generator: torch.Generator) -> dict[str, Any]:
    """Load a checkpoint into the freshly built run: weights, optimizer, schedule position, RNGs."""
    ckpt = load_checkpoint(path, map_location=device)
    fused = [group.get("fused") for group in optimizer.param_groups]  # a property of this device, not the saved one
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, flag in zip(optimizer.param_groups, fused):
            group["fused"] = flag
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path} does not fit this {run.model.name} run (was it written for another model "
                          f"or optimizer?): {str(err).splitlines()[0]}") from None
    # The schedule itself is rebuilt from the config, so a larger trainer.epochs re-plans it;
    # only its position (the step count) comes from the checkpoint.
    state = dict(ckpt["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas))
    scheduler.load_state_dict(state)
    if ckpt["config"]["trainer"]["epochs"] != run.trainer.epochs:
        for group, base, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * schedule(scheduler.last_epoch)
    restore_rng(ckpt["rng"], generator)
    return ckpt


def _fit(run: RunConfig, run_dir: Path, summary: dict[str, Any], overrides: list[str],
         stop: GracefulStop, trackers: Trackers) -> dict[str, Any]:
    t = run.trainer
    configure_determinism(t.deterministic)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    prep = prepare(run)
    device, spec, model = prep.device, prep.spec, prep.model
    card = model_card(model, run.model.name, prep.pipeline.output_shape, spec.num_classes)
    log.info("model %s: %s parameters (%.2f MB), %s MACs per image, input %s, device %s",
             run.model.name, f"{card.params_total:,}", card.model_size_mb, human(card.macs_per_image),
             "x".join(map(str, card.input_shape)), device)
    if card.reference_line:
        log.info("reference: %s", card.reference_line)

    world = world_from_env()
    if t.batch_size % world.size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is the global batch and must divide evenly over the "
                          f"{world.size} processes of this torchrun; use a multiple of {world.size}")
    data = load_dataset(run.dataset, seed=t.seed)
    spec = data.spec  # the class names the files name (a first download may fill in a spec's placeholders)
    loader = choose_loader(run.dataset.loader, [data.train, data.val, data.test], device)
    workers = stream_workers(run.dataset.num_workers, data.train)
    if loader == "resident":
        train, val, test = (_resident(s, device) for s in (data.train, data.val, data.test))
    else:
        train, val, test = data.train, data.val, data.test
    log.info("data %s: %d train / %d val / %d test images, %d classes, %s%s",
             spec.name, len(train), len(val) if val else 0, len(test), spec.num_classes, loader,
             f" ({workers} workers)" if loader == "streaming" else " on the device")
    val, test = _shard(val, world), _shard(test, world)
    if world.distributed:
        torch.manual_seed(t.seed + world.rank)  # weights are built alike on every rank; dropout differs per rank

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    ctx = StepContext(
        pipeline=prep.pipeline,
        loss_fn=build_loss(run.loss, spec.num_classes),
        device=device,
        bf16=t.precision == "bf16" and device.type == "cuda",
        channels_last=t.channels_last,
        generator=generator,
    )
    if t.precision == "bf16" and not ctx.bf16:
        log.warning("trainer.precision=bf16 applies on CUDA only; training in fp32 on %s", device)
    if loader == "resident":
        batches = Batches(train.images, train.labels, t.batch_size, shuffle=True, drop_last=True,
                          generator=generator, world=world)
    else:
        batches = StreamingBatches(train, t.batch_size, device, workers, shuffle=True, drop_last=True,
                                   generator=generator, world=world)
    # Training steps run the compiled (and, under torchrun, DDP-wrapped) module; it shares its weights
    # with `model`, which evaluation, the doctor and checkpoints use. Training batches all have one
    # shape (drop_last) and the compiled module only ever runs in train mode, so nothing recompiles.
    step_model = model
    if world.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        step_model = torch.compile(step_model, mode=t.compile_mode)
    optimizer = build_optimizer(run.optimizer, model.parameters())
    scheduler = build_scheduler(run.scheduler, optimizer, len(batches), t.epochs)

    best_acc, best_epoch, train_seconds, done, partial = -1.0, 0, 0.0, 0, None
    if t.resume:
        point = resume_point(t.resume)
        ckpt = _restore(point.checkpoint, run, device, model, optimizer, scheduler, generator)
        done = ckpt["epoch"]
        if ckpt.get("partial") is None:
            check_epochs(t.epochs, done, point.checkpoint)
        best_acc, best_epoch = ckpt.get("best_val_acc", -1.0), ckpt.get("best_epoch", done)
        train_seconds = ckpt.get("train_seconds", 0.0)
        partial = EpochState.from_state_dict(ckpt["partial"], device) if ckpt.get("partial") else None
        if partial and not world.is_main:  # the checkpoint holds the sums over all ranks: count them once
            partial.loss_sum.zero_()
            partial.correct.zero_()
            partial.seen = 0
        if world.is_main:
            trim_metrics(run_dir, done)
        summary.setdefault("resumes", []).append(
            {"at": _now(), "checkpoint": str(point.checkpoint), "epoch": done, "step": ckpt["step"],
             "epochs": t.epochs, "overrides": overrides})
        for stale in ("error", "interrupted_at", "resume_command", "diagnosis", "finished_at"):
            summary.pop(stale, None)
        log.info("resumed %s at epoch %d%s, step %d; training to epoch %d", point.checkpoint, done,
                 f" + {partial.step} batches" if partial else "", ckpt["step"], t.epochs)
    summary["status"] = "running"
    if world.is_main:
        atomic_write_text(run_dir / "model_summary.txt", card.text())
    summary.update(device=str(device), num_classes=spec.num_classes, seed=t.seed, **card.summary_fields(),
                   train_size=len(train), val_size=len(data.val) if data.val else 0, test_size=len(data.test),
                   precision="bf16" if ctx.bf16 else "fp32", loader=loader, world_size=world.size)

    ckpt_dir = run_dir / "checkpoints"

    def checkpoint(path: Path, epoch: int, state: EpochState | None = None, val_acc: float | None = None) -> None:
        steps = epoch * len(batches) + (state.step if state else 0)
        if not world.is_main:
            return
        save_checkpoint(
            path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=None,  # bf16 autocast needs no loss scaling; the slot keeps the format ready for fp16
            epoch=epoch, step=steps, rng=rng_state(generator), config=run.to_dict(), val_acc=val_acc,
            best_val_acc=best_acc, best_epoch=best_epoch, train_seconds=round(train_seconds, 3),
            partial=state.state_dict() if state else None,
            spec=dataclasses.asdict(spec),  # input shape, class names, stats: inference needs no dataset files
        )

    def interrupted(signum: int, epoch: int, state: EpochState | None) -> Interrupted:
        where = {"epoch": epoch, "step": (epoch - 1) * len(batches) + (state.step if state else len(batches))}
        summary.update(status="interrupted", interrupted_at=where, train_seconds=round(train_seconds, 3),
                       resume_command=f"{distributed.command_prefix(world)} trainer.resume={run_dir.resolve()}")
        return Interrupted(signum)

    probe = _head(train, t.batch_size, device)  # the doctor's fixed batch: the same on every rank
    show_progress = t.progress and sys.stderr.isatty() and world.is_main
    # under torchrun every rank must stop at the same step, so a signal on one stops them all
    stopping = (lambda: distributed.any_rank(stop.requested())) if world.distributed else stop.requested
    for epoch in range(done + 1, t.epochs + 1):
        state, partial = partial or EpochState.begin(batches, optimizer, device), None
        tic = time.perf_counter()
        with tqdm(total=len(batches), initial=state.step, desc=f"epoch {epoch}/{t.epochs}", leave=False,
                  delay=PROGRESS_DELAY_S, disable=not show_progress, file=sys.stderr) as bar:
            run_steps(step_model, batches, ctx, optimizer, scheduler, state, bar, stopping, t.grad_clip)
        elapsed = time.perf_counter() - tic
        state.seconds += elapsed
        train_seconds += elapsed
        state.reduce()
        if state.step < len(batches):  # a signal stopped the epoch between two steps
            checkpoint(ckpt_dir / "last.pt", epoch - 1, state)
            raise interrupted(stop.signum or signal.SIGTERM, epoch, state)

        train_loss, train_acc, seen = state.results()
        eval_tic = time.perf_counter()
        val_result = evaluate(model, val, ctx, t.eval_batch_size, spec.num_classes, workers) if val else None
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_result.loss if val_result else "",
            "val_acc": val_result.acc if val_result else "",
            "lr": state.lr,
            "epoch_seconds": round(state.seconds + time.perf_counter() - eval_tic, 4),  # training + validation
            "images_per_second": round(seen / state.seconds, 1),
        }
        if world.is_main:
            report.append_metrics(run_dir, row)
            trackers.log_epoch(row)
        summary.update(epochs_completed=epoch, train_seconds=round(train_seconds, 3),
                       final_train_loss=train_loss, final_train_acc=train_acc)
        if val_result:
            summary.update(final_val_loss=val_result.loss, final_val_acc=val_result.acc)
        val_text = f"val loss {val_result.loss:.4f} acc {val_result.acc:.2%}  " if val_result else ""
        log.info("epoch %d/%d  train loss %.4f acc %.2f%%  %slr %.3g  %.1fs  %.0f img/s", epoch, t.epochs,
                 train_loss, 100 * train_acc, val_text, state.lr, row["epoch_seconds"], seen / state.seconds)

        first_bad = int(state.first_nonfinite.item())
        if first_bad >= 0 or not math.isfinite(train_loss):
            _diverged(run, summary, epoch, (epoch - 1) * len(batches) + max(first_bad, 0) + 1)
            break

        diagnosis = None
        if t.doctor_every and (epoch == 1 or epoch % t.doctor_every == 0):
            diagnosis = distributed.broadcast(doctor.examine(  # rank 0's verdict, so every rank stops alike
                model, probe.images, probe.labels, ctx, run, epoch, train_loss, val_result, spec.num_classes))
            summary["diagnosis"] = diagnosis.to_dict() if diagnosis else None
            if diagnosis:
                log.warning("%s", diagnosis.text())

        # Without a validation split the last epoch stands in for the best one.
        score = val_result.acc if val_result else float(epoch)
        if score > best_acc:
            best_acc, best_epoch = score, epoch
        checkpoint(ckpt_dir / "last.pt", epoch, val_acc=val_result.acc if val_result else None)
        if best_epoch == epoch:
            checkpoint(ckpt_dir / "best.pt", epoch, val_acc=val_result.acc if val_result else None)
        if stopping():  # the signal came during validation or the save: stop at this boundary
            raise interrupted(stop.signum or signal.SIGTERM, epoch, None)
        if diagnosis and diagnosis.stuck and t.stop_when_stuck:
            summary.update(status="stuck", stopped_at_epoch=epoch)
            log.warning("trainer.stop_when_stuck: ending the run after epoch %d of %d", epoch, t.epochs)
            break

    summary.update(best_epoch=best_epoch or None, best_val_acc=best_acc if (val and best_epoch) else None)
    if best_epoch:
        # The test set is scored once, with the weights that were best on validation.
        distributed.barrier()  # rank 0 has written best.pt
        model.load_state_dict(load_checkpoint(ckpt_dir / "best.pt", map_location=device)["model"])
        result = evaluate(model, test, ctx, t.eval_batch_size, spec.num_classes, workers)
        summary.update(test_loss=result.loss, test_acc=result.acc, test_checkpoint="best" if val else "last")
        log.info("test (epoch %d weights): loss %.4f  accuracy %.2f%%", best_epoch, result.loss, 100 * result.acc)
        if world.is_main:
            report.write_confusion(run_dir, result.confusion, spec.classes)
            if prep.viz_layer:
                summary["feature_maps"] = _draw_feature_maps(run, run_dir, model, _head(test, run.viz.num_images, device),
                                                             ctx, prep.viz_layer, spec)
    if world.is_main:
        report.plot_curves(run_dir, title=f"{run.model.name} on {spec.name}")
    if summary["status"] == "running":
        summary["status"] = "completed"
    summary["config"] = run.to_dict()
    return summary


def _diverged(run: RunConfig, summary: dict[str, Any], epoch: int, step: int) -> None:
    """status: diverged, where, and the console hints that apply to this config."""
    summary.update(status="diverged", diverged_epoch=epoch, diverged_step=step)
    hints = [f"a lower learning rate (optimizer.lr={run.optimizer.lr / 10:g})"]
    if not run.scheduler.warmup_epochs:
        hints.append("a warm-up (scheduler.warmup_epochs=1)")
    if not run.trainer.grad_clip:
        hints.append("gradient clipping (trainer.grad_clip=1.0)")
    if getattr(run.model, "batch_norm", True) is False:
        hints.append("batch norm (model.batch_norm=true)")
    summary["hints"] = hints
    log.error("training diverged: the loss became NaN/inf at step %d (epoch %d), so the run stopped there. "
              "Try %s.", step, epoch, ", ".join(hints))


def _draw_feature_maps(run: RunConfig, run_dir: Path, model: torch.nn.Module, panels: Split, ctx: StepContext,
                       layer: str, spec: DatasetSpec) -> dict[str, Any]:
    """feature_maps.png for the first viz.num_images test images; returns what summary.json records."""
    images, labels = panels.images, panels.labels
    with ctx.autocast():
        activations, predicted = viz.capture(model, layer, ctx.inputs(images, train=False))
    panels = viz.plot_feature_maps(
        run_dir / "feature_maps.png", images, activations, predicted.tolist(), labels.tolist(), spec.classes,
        run.viz.channels, title=f"{run.model.name}: feature maps at {layer} "
        f"({activations.shape[1]} channels, {activations.shape[2]}x{activations.shape[3]})",
    )
    return {"file": "feature_maps.png", "layer": layer, "panels": panels,
            "channels_shown": min(run.viz.channels, activations.shape[1]),
            "predicted": predicted.tolist(), "true": labels.tolist()}
