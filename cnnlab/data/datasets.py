"""From a dataset config to its splits, the same way for every registered dataset.

    spec = spec_for(cfg)            # shape, classes, mean/std: reads no pixels
    data = load_dataset(cfg, seed)  # train / val / test splits, uint8 tensors or image files

The dataset's own loader (registry.py) gives whole splits; here they are checked, the seeded
subset is drawn and the validation split carved out, so every dataset behaves alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.checks import ConfigError
from cnnlab.data.registry import DatasetConfig, DatasetSpec, Loaded, entry, schema_for, val_count
from cnnlab.data.splits import FileSplit, Split


@dataclass
class DataBundle:
    spec: DatasetSpec
    train: Split | FileSplit
    val: Split | FileSplit | None
    test: Split | FileSplit


def coerce(cfg: DatasetConfig) -> DatasetConfig:
    """A plain DatasetConfig named "synthetic" becomes a SyntheticConfig with default extras."""
    schema = schema_for(cfg.name)
    if type(cfg) is schema:
        return cfg
    return schema(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def spec_for(cfg: DatasetConfig) -> DatasetSpec:
    """Shape, classes and normalization stats of a dataset, without reading any pixel data."""
    cfg = coerce(cfg)
    return entry(cfg.name).spec(cfg)


def load_dataset(cfg: DatasetConfig, seed: int, read: dict[str, tuple[DatasetSpec, Loaded]] | None = None) -> DataBundle:
    """Load a whole dataset (image-file datasets: as FileSplits, decoded later); the subset and the
    val split are drawn with torch.Generators seeded by `seed`, so the same seed always gives the
    same split. read: datasets read before, by config, split here anew (a fused group's members with
    other seeds read the files once)."""
    cfg = coerce(cfg)
    cfg.validate()
    key = repr(cfg)
    if read is not None and key in read:
        spec, loaded = read[key]
    else:
        spec = spec_for(cfg)
        loaded = entry(cfg.name).load(cfg, spec)
        spec = _named(spec, loaded.classes, cfg)
        _check(loaded, spec, cfg)
        if read is not None:
            read[key] = spec, loaded
    return _select(cfg, spec, loaded, seed)


def _named(spec: DatasetSpec, classes: tuple[str, ...] | None, cfg: DatasetConfig) -> DatasetSpec:
    """The spec with the class names the files hold (a first download may fill in placeholders)."""
    if classes is None:
        return spec
    if len(classes) != spec.num_classes:
        raise ConfigError(
            f"dataset {cfg.name}: its files under {Path(cfg.root).expanduser()} name {len(classes)} classes, "
            f"expected {spec.num_classes}; they are corrupted or from another dataset. Delete the dataset "
            f"folder and download it again (dataset.download=true)."
        )
    return dataclasses.replace(spec, classes=tuple(classes))


def _check(loaded: Loaded, spec: DatasetSpec, cfg: DatasetConfig) -> None:
    """Every split has the spec's image shape and labels in 0..classes-1."""
    root = Path(cfg.root).expanduser()
    shape = (spec.channels, spec.height, spec.width)
    named = (("train", loaded.train), ("val", loaded.val), ("test", loaded.test))
    for name, split in ((n, s) for n, s in named if s is not None):
        if not len(split) and name != "val":  # a run trains on one and is scored on the other
            raise ConfigError(f"dataset {cfg.name}: the {name} split is empty (no images under {root}); "
                              f"a run needs training images and test images to score on")
        if tuple(split.shape) != shape:
            raise ConfigError(f"dataset {cfg.name}: {name} images are {tuple(split.shape)}, "
                              f"expected {shape}; the files under {root} are not {cfg.name}")
        labels = split.labels
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise ConfigError(
                f"dataset {cfg.name}: {name} labels range over {int(labels.min())}..{int(labels.max())}, "
                f"expected 0..{spec.num_classes - 1}; the label file under {root} is corrupted "
                f"or from another dataset: delete it and download again (dataset.download=true)"
            )


def _select(cfg: DatasetConfig, spec: DatasetSpec, loaded: Loaded, seed: int) -> DataBundle:
    """The seeded subset of the training pool and of the test set, and the val split: carved from
    the pool by dataset.val_split, or the dataset's own validation split as it is."""
    pool, test, val = loaded.train, loaded.test, loaded.val
    train_gen = _generator(seed, 0)
    if cfg.subset is not None and cfg.subset < len(pool):
        pool = _take(pool, torch.randperm(len(pool), generator=train_gen)[: cfg.subset])
    train = pool
    if val is not None:
        if cfg.subset is not None and cfg.subset < len(val):
            val = _take(val, torch.randperm(len(val), generator=_generator(seed, 2))[: cfg.subset])
    else:
        n_val = val_count(cfg.val_split, len(pool))
        if n_val >= len(pool):
            raise ConfigError(
                f"dataset.val_split={cfg.val_split!r} holds out {n_val} of the {len(pool)} training "
                f"examples and leaves none for training; lower it"
                + (" or raise dataset.subset" if cfg.subset else "")
            )
        if n_val:
            perm = torch.randperm(len(pool), generator=train_gen)
            val, train = _take(pool, perm[:n_val]), _take(pool, perm[n_val:])
    if cfg.subset is not None and cfg.subset < len(test):
        test = _take(test, torch.randperm(len(test), generator=_generator(seed, 1))[: cfg.subset])
    return DataBundle(spec, train.contiguous(), None if val is None else val.contiguous(), test.contiguous())


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent generators per use (subset+val, test subset) from one user seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % 2**63)


def _take(split: Split | FileSplit, index: torch.Tensor) -> Split | FileSplit:
    return split.take(index.sort().values)  # keep the file order: better locality, stable across seeds
