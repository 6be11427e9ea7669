"""Mini-batches of a split, resident or streamed, and the choice between the two.

Resident: a split lives on the training device as one uint8 tensor; an epoch is a randperm and
every batch one indexing op. Streaming: DataLoader workers read batches from host memory or
image files and copy them over, for data larger than device memory. Both draw the same sample
order from the same generator and shard it the same way under torchrun, so a run gives the same
batches either way (tested).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnlab.data.datasets import DataBundle
from cnnlab.data.splits import FileSplit, Split
from cnnlab.distributed import World
from cnnlab.memory import available_bytes, gigabytes

log = logging.getLogger("cnnlab")

AnySplit = Split | FileSplit
# Resident data may take this share of the device's free memory; the rest is for the model,
# activations and optimizer state.
RESIDENT_FRACTION = 0.5


class _Order:
    """The sample order and per-batch indices both kinds of batches share."""

    labels: torch.Tensor
    batch_size: int  # the global batch: under torchrun each rank takes its slice of it
    shuffle: bool
    # Training drops the ragged last batch (a batch of 1 breaks BatchNorm, and fixed shapes
    # keep compiled graphs stable) unless the split is smaller than one batch.
    drop_last: bool
    generator: torch.Generator | None
    world: World

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor | None:
        """This epoch's sample order: a fresh randperm when shuffling, None for the stored order.
        Drawn on the generator's device, so both kinds (and every rank) draw the same order."""
        if not self.shuffle:
            return None
        device = self.generator.device if self.generator is not None else self.labels.device
        return torch.randperm(len(self.labels), device=device, generator=self.generator)

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
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.take(self.order())


@dataclass
class Batches(_Order):
    """Mini-batches of a device-resident split; a fresh randperm each epoch when shuffling."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    generator: torch.Generator | None = None
    world: World = World()

    def take(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (images, labels) batches of one epoch in `order`, from batch `start` on."""
        for idx in self.indices(order, start):
            yield self.images[idx], self.labels[idx]


class _IndexedBatches(torch.utils.data.Dataset):
    """A DataLoader dataset whose items are whole batches: the sampler yields index tensors."""

    def __init__(self, split: AnySplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.batch(index)  # image files are decoded here, in a worker process


@dataclass
class StreamingBatches(_Order):
    """The batches of Batches, read from host memory or image files by DataLoader workers and
    copied to the device batch by batch."""

    split: AnySplit
    batch_size: int
    device: torch.device
    num_workers: int
    shuffle: bool = False
    drop_last: bool = False
    generator: torch.Generator | None = None
    world: World = World()

    @property
    def labels(self) -> torch.Tensor:  # on the CPU, so every index is one the workers can use
        return self.split.labels

    def take(self, order: torch.Tensor | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = None if order is None else order.cpu()  # one sync per epoch, for the sampler
        indices = [torch.arange(i.start, i.stop) if isinstance(i, slice) else i for i in self.indices(order, start)]
        if not indices:
            return
        loader = torch.utils.data.DataLoader(
            _IndexedBatches(self.split), sampler=indices, batch_size=None, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def batches_of(split: AnySplit, batch_size: int, device: torch.device, num_workers: int = 0) -> Batches | StreamingBatches:
    """Evaluation batches in stored order: read in place when the split is resident on `device`, else streamed."""
    if split.resident and split.images.device == device:
        return Batches(split.images, split.labels, batch_size)
    return StreamingBatches(split, batch_size, device, num_workers)


# ------------------------------------------------------------------------------- loader choice


def _free_memory(device: torch.device) -> float:
    return available_bytes(device)


def choose_loader(choice: str, splits: list[AnySplit | None], device: torch.device, reserved: float = 0.0) -> str:
    """dataset.loader=auto: resident when the uint8 splits fit in RESIDENT_FRACTION of the
    device's free memory, less `reserved` bytes that others will take (a fused group's training steps),
    else streaming. Tensors already in RAM on a CPU run stay resident."""
    if choice != "auto":
        return choice
    present = [s for s in splits if s is not None]
    if device.type == "cpu" and all(s.resident for s in present):
        return "resident"
    need, free = sum(s.nbytes for s in present), _free_memory(device)
    loader = "resident" if need <= RESIDENT_FRACTION * (free - reserved) else "streaming"
    kept = f", {gigabytes(reserved)} of it kept for the fused group's training steps" if reserved else ""
    log.info("dataset.loader=auto: %s (the data is %.2f GB as uint8, %.2f GB free on %s%s)", loader, need / 1e9,
             free / 1e9, device, kept)
    return loader


def stream_workers(num_workers: int | None, split: AnySplit) -> int:
    """dataset.num_workers, or when null: worker processes to decode image files (min(8, cores)),
    none for tensors already in memory, where a batch is one indexed copy that workers would only
    pass through shared memory (measured on 2 CPU cores: as fast as resident without workers,
    half as fast with 2)."""
    if num_workers is not None:
        return num_workers
    return 0 if split.resident else min(8, os.cpu_count() or 1)


def head(split: AnySplit, n: int, device: torch.device) -> Split:
    """The first n examples on the device: the doctor's probe batch, feature-map panels."""
    return split.head(n).to(device)


def shard(split: AnySplit | None, world: World) -> AnySplit | None:
    """This rank's contiguous share of an evaluation split."""
    if split is None or not world.distributed:
        return split
    index = torch.arange(len(split)).tensor_split(world.size)[world.rank]
    return split.take(index.to(split.labels.device))


def placed(split: AnySplit, device: torch.device) -> AnySplit:
    """A resident split moved to `device`; a file split stays where it is, to be streamed."""
    return split.to(device) if split.resident else split


# ------------------------------------------------------------------------------- a run's data


@dataclass
class RunData:
    """A run's splits after the loader choice: resident ones on the device, eval splits sharded."""

    loader: str  # resident | streaming
    workers: int  # DataLoader workers of the streaming path
    train: AnySplit
    val: AnySplit | None  # this rank's shard
    test: AnySplit  # this rank's shard
    val_size: int  # the whole splits, over all ranks
    test_size: int

    def training_batches(self, batch_size: int, device: torch.device, generator: torch.Generator,
                         world: World) -> Batches | StreamingBatches:
        """Shuffled, ragged last batch dropped; each rank takes its slice of every global batch."""
        if self.loader == "resident":
            return Batches(self.train.images, self.train.labels, batch_size, shuffle=True, drop_last=True,
                           generator=generator, world=world)
        return StreamingBatches(self.train, batch_size, device, self.workers, shuffle=True, drop_last=True,
                                generator=generator, world=world)


def place_data(data: DataBundle, choice: str, num_workers: int | None, device: torch.device, world: World,
               reserved: float = 0.0) -> RunData:
    """dataset.loader and dataset.num_workers applied to a loaded dataset; reserved: see choose_loader."""
    loader = choose_loader(choice, [data.train, data.val, data.test], device, reserved)
    workers = stream_workers(num_workers, data.train)
    splits = (data.train, data.val, data.test)
    if loader == "resident":
        splits = tuple(None if s is None else s.load().to(device) for s in splits)
    train, val, test = splits
    return RunData(loader, workers, train, shard(val, world), shard(test, world), len(val) if val else 0, len(test))
