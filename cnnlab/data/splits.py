"""The two kinds of split a dataset gives, behind one small interface.

`Split` holds its images as one uint8 tensor (in RAM or on the device); `FileSplit` holds image
files, decoded on demand. Batching, loader choice, sharding and evaluation use only what both
have, so they never ask which kind they hold:

    len(split), split.labels     int64 [N]
    split.resident               True when the images are a tensor already (nothing to decode)
    split.shape                  (C, H, W) of every image
    split.nbytes                 the images' size as uint8, decoded
    split.take(index)            the same kind of split, holding those examples
    split.batch(index)           (images, labels) of those examples, decoded
    split.head(n)                the first n examples as a Split (the doctor's probe, feature-map panels)
    split.load()                 everything as one Split (a Split returns itself)
    split.contiguous()           int64 labels, contiguous storage
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from cnnlab.data.cache import ImageCache
from cnnlab.data.images import read_image, read_into


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    resident = True  # class attribute: not a dataclass field

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Split:
        return Split(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))

    def take(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])

    def load(self, threads: int | None = None) -> Split:
        return self

    def contiguous(self) -> Split:
        return Split(self.images.contiguous(), self.labels.to(torch.int64).contiguous())


@dataclass
class FileSplit:
    """A split kept as image files, decoded on demand: by DataLoader workers when streaming, or
    all at once by `load` for the resident path. Every image is read as `channels` x `size`."""

    paths: list[Path]
    labels: torch.Tensor  # int64 [N]
    channels: int
    size: tuple[int, int]  # (height, width) every image is framed to
    # Decoded images kept on disk across runs (load reads them from there); cache_index: where each of
    # these files sits in the cache's pool, so a subset or a val split shares the whole pool's cache.
    cache: Optional[ImageCache] = field(default=None, repr=False)
    cache_index: Optional[torch.Tensor] = field(default=None, repr=False)

    resident = False

    def __post_init__(self) -> None:
        if self.cache is not None and self.cache_index is None:
            self.cache_index = torch.arange(len(self.paths))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> torch.Tensor:
        """uint8 [C, H, W] of one image."""
        return read_image(self.paths[index], self.channels, self.size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    @property
    def nbytes(self) -> int:
        return len(self) * self.channels * self.size[0] * self.size[1]

    def take(self, index: torch.Tensor) -> FileSplit:
        return FileSplit([self.paths[i] for i in index.tolist()], self.labels[index], self.channels, self.size,
                         self.cache, None if self.cache is None else self.cache_index[index])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded here: in a DataLoader worker process when streaming."""
        return torch.stack([self[i] for i in index.tolist()]), self.labels[index]

    def head(self, n: int) -> Split:
        """The first n images decoded."""
        n = min(n, len(self))
        return Split(torch.stack([self[i] for i in range(n)]) if n else
                     torch.empty(0, self.channels, *self.size, dtype=torch.uint8), self.labels[:n].clone())

    def load(self, threads: int | None = None) -> Split:
        """Every image decoded into one uint8 [N, C, H, W] tensor (threads: decoding releases the GIL);
        with a cache, images decoded by an earlier run are read from it instead."""
        if self.cache is not None:
            return Split(self.cache.load(self.cache_index, threads), self.labels.clone())
        images = torch.empty(len(self), self.channels, *self.size, dtype=torch.uint8)
        read_into(images, range(len(self)), self.paths, self.channels, self.size, threads)
        return Split(images, self.labels.clone())

    def contiguous(self) -> FileSplit:
        return dataclasses.replace(self, labels=self.labels.to(torch.int64).contiguous())
