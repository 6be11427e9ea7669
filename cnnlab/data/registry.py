"""The dataset registry: every dataset registers its config schema, its spec and its loader by name.

A dataset is one module plus one YAML (conf/dataset/<name>.yaml). The module calls

    register_dataset("mnist", spec=lambda cfg: MNIST_SPEC, load=load_mnist, train_size=60_000)

where `spec(cfg)` gives the shape, classes and normalization stats without reading pixels, and
`load(cfg, spec)` gives the whole splits as `Loaded` (uint8 tensors or image files); subsets,
the validation split, the seed and the checks are the same for every dataset (datasets.py).
A dataset with keys of its own passes `schema=`, a DatasetConfig subclass. Users register theirs
the same way, from their own module.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

from cnnlab.checks import ConfigError, check_choice, check_range, is_whole
from cnnlab.data.splits import FileSplit, Split

LOADERS = ("auto", "resident", "streaming")
# where datasets are looked for unless the user names a folder (dataset.root, or $CNNLAB_DATA in conf/)
DEFAULT_ROOT = "~/.cache/cnnlab/data"


@dataclass
class DatasetConfig:
    name: str = "???"
    root: str = DEFAULT_ROOT  # where files are looked for and downloaded to (~ expanded)
    download: bool = True  # download with torchvision when the files are not found
    # held out of the training set for validation: a fraction in [0, 1), or a count >= 1
    # (5000 -> 45000 train / 5000 val on CIFAR); 0 -> no validation split
    val_split: float = 0.1
    # quick runs: at most this many training examples (before the val split) and test examples
    subset: Optional[int] = None
    # resident: whole splits live on the training device as uint8 (fastest); streaming: batches come
    # through a DataLoader with workers (data larger than device memory); auto: resident when it fits
    loader: str = "auto"
    num_workers: Optional[int] = None  # streaming DataLoader workers; null = min(8, cores) for image files, 0 in memory

    def validate(self, prefix: str = "dataset") -> None:
        check_choice(f"{prefix}.name", self.name, available())
        check_choice(f"{prefix}.loader", self.loader, LOADERS)
        if self.num_workers is not None:
            check_whole(f"{prefix}.num_workers", self.num_workers, 0, "or null")
        if not isinstance(self.root, str) or not self.root.strip():
            raise ConfigError(f"{prefix}.root={self.root!r} must be a folder path")
        if not isinstance(self.download, bool):
            raise ConfigError(f"{prefix}.download={self.download!r} must be true or false")
        if self.subset is not None:
            check_whole(f"{prefix}.subset", self.subset, 1, "or null")
        self._validate_val_split(prefix)

    def _validate_val_split(self, prefix: str) -> None:
        v = self.val_split
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ConfigError(f"{prefix}.val_split={v!r} must be a fraction in [0, 1) or a whole count >= 1")
        check_range(f"{prefix}.val_split", v, 0)
        if v >= 1 and not is_whole(v):
            raise ConfigError(f"{prefix}.val_split={v!r} is neither a fraction in [0, 1) nor a whole count >= 1")
        pool = self.train_pool_size()
        if pool is not None and val_count(v, pool) >= pool:
            raise ConfigError(
                f"{prefix}.val_split={v!r} leaves no training examples: the training pool of "
                f"{self.name} has {pool}{' (after ' + prefix + '.subset)' if self.subset else ''}; "
                f"use a count below {pool} or a fraction below 1"
            )

    def root_is_default(self) -> bool:
        """The user named no folder: a system copy of the dataset may stand in for missing files there.
        A folder the user names is used, or refused, but never swapped for another copy."""
        return Path(self.root).expanduser() == Path(DEFAULT_ROOT).expanduser()

    def train_pool_size(self) -> int | None:
        """The training pool after dataset.subset, when it is known without reading files."""
        size = _REGISTRY[self.name].train_size if self.name in _REGISTRY else None
        if size is None:
            return None
        return min(size, self.subset) if self.subset else size


def check_whole(key: str, value: object, low: int, alternative: str = "") -> None:
    """A whole number >= low (a bool is not one); `alternative` names what else the key takes."""
    if not is_whole(value):
        raise ConfigError(f"{key}={value!r} must be a whole number >= {low}{' ' + alternative if alternative else ''}")
    check_range(key, value, low)


def val_count(val_split: float, pool: int) -> int:
    """Examples dataset.val_split holds out of a training pool of `pool`."""
    if val_split >= 1:
        return int(val_split)
    if val_split <= 0:
        return 0
    # at least one example when a fraction is asked for, rounding otherwise
    return max(1, int(round(val_split * pool)))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Loaded:
    """What a dataset's loader gives: whole splits, before the subset and the validation split."""

    train: Split | FileSplit  # the training pool
    test: Split | FileSplit
    val: Split | FileSplit | None = None  # a validation split the dataset ships; else carved from train
    classes: tuple[str, ...] | None = None  # class names the files hold, when they hold them


SpecFn = Callable[[DatasetConfig], DatasetSpec]
LoadFn = Callable[[DatasetConfig, DatasetSpec], Loaded]


@dataclass(frozen=True)
class DatasetEntry:
    schema: type[DatasetConfig]
    spec: SpecFn  # shape, classes and stats; reads no pixels
    load: LoadFn
    train_size: int | None  # the training pool, when known without its files (checks val_split early)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, spec: SpecFn, load: LoadFn, schema: type[DatasetConfig] = DatasetConfig,
                     train_size: int | None = None) -> None:
    """Add dataset `name`; conf/dataset/<name>.yaml (or a user's config dir) makes it selectable."""
    if not (isinstance(schema, type) and issubclass(schema, DatasetConfig)):
        raise TypeError(f"schema for dataset {name!r} must be a DatasetConfig subclass, got {schema!r}")
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = DatasetEntry(schema, spec, load, train_size)


def available() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> DatasetEntry:
    check_choice("dataset.name", name, available())
    return _REGISTRY[name]


def schema_for(name: str) -> type[DatasetConfig]:
    return entry(name).schema
