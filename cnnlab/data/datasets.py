"""Dataset configs (OmegaConf schemas), static specs, and loading into uint8 tensors.

The chain is: DatasetConfig -> spec_for (shape, classes, mean/std, no pixels read) ->
load_dataset (whole splits as uint8 [N, C, H, W] CPU tensors, ready to move to the device).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data import sources

# ------------------------------------------------------------------------------- configs


@dataclass
class DatasetConfig:
    name: str = "???"
    root: str = "~/.cache/cnnlab/data"  # where files are looked for and downloaded to (~ expanded)
    download: bool = True  # download with torchvision when the files are not found
    # held out of the training set for validation: a fraction in [0, 1), or a count >= 1
    # (5000 -> 45000 train / 5000 val on CIFAR); 0 -> no validation split
    val_split: float = 0.1
    # quick runs: at most this many training examples (before the val split) and test examples
    subset: Optional[int] = None

    def validate(self, prefix: str = "dataset") -> None:
        check_choice(f"{prefix}.name", self.name, available())
        if not isinstance(self.root, str) or not self.root.strip():
            raise ConfigError(f"{prefix}.root={self.root!r} must be a folder path")
        if not isinstance(self.download, bool):
            raise ConfigError(f"{prefix}.download={self.download!r} must be true or false")
        if self.subset is not None:
            if isinstance(self.subset, bool) or not _is_int(self.subset):
                raise ConfigError(f"{prefix}.subset={self.subset!r} must be a whole number >= 1 or null")
            check_range(f"{prefix}.subset", self.subset, 1)
        v = self.val_split
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ConfigError(
                f"{prefix}.val_split={v!r} must be a fraction in [0, 1) or a whole count >= 1"
            )
        check_range(f"{prefix}.val_split", v, 0)
        if v >= 1 and not _is_int(v):
            raise ConfigError(
                f"{prefix}.val_split={v!r} is neither a fraction in [0, 1) nor a whole count >= 1"
            )
        pool = self._train_pool_size()
        if pool is not None and _val_count(v, pool) >= pool:
            raise ConfigError(
                f"{prefix}.val_split={v!r} leaves no training examples: the training pool of "
                f"{self.name} has {pool}{' (after ' + prefix + '.subset)' if self.subset else ''}; "
                f"use a count below {pool} or a fraction below 1"
            )

    def _train_pool_size(self) -> int | None:
        size = _TRAIN_SIZES.get(self.name)
        if size is None:
            return None
        return min(size, self.subset) if self.subset else size


@dataclass
class SyntheticConfig(DatasetConfig):
    """Seeded random images for smoke runs; each class is a smooth random uint8 prototype plus
    Gaussian noise, so a model learns it quickly (accuracy well above chance in a few steps)."""

    name: str = "synthetic"
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32  # height = width, pixels
    train_size: int = 512  # examples, before the val split
    test_size: int = 256
    noise: float = 0.25  # std of the per-pixel noise, as a fraction of the 0..255 range
    seed: int = 0  # seeds the images themselves; the split uses load_dataset's seed

    def validate(self, prefix: str = "dataset") -> None:
        for key, low in (("num_classes", 2), ("channels", 1), ("image_size", 1),
                         ("train_size", 1), ("test_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not _is_int(value):
                raise ConfigError(f"{prefix}.{key}={value!r} must be a whole number >= {low}")
            check_range(f"{prefix}.{key}", value, low)
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)):
            raise ConfigError(f"{prefix}.noise={self.noise!r} must be a number >= 0")
        check_range(f"{prefix}.noise", self.noise, 0)
        if isinstance(self.seed, bool) or not _is_int(self.seed):
            raise ConfigError(f"{prefix}.seed={self.seed!r} must be a whole number")
        super().validate(prefix)

    def _train_pool_size(self) -> int | None:
        return min(self.train_size, self.subset) if self.subset else self.train_size


def _is_int(value) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


# ------------------------------------------------------------------------------- specs


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


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# The 100 fine label names, in the order of cifar-100-python/meta (sorted alphabetically).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_STATIC_SPECS = {
    "cifar10": DatasetSpec("cifar10", CIFAR10_CLASSES, 3, 32, 32,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", CIFAR100_CLASSES, 3, 32, 32,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": DatasetSpec("fashion_mnist", FASHION_MNIST_CLASSES, 1, 28, 28,
                                 (0.2860,), (0.3530,)),
    "mnist": DatasetSpec("mnist", tuple(str(d) for d in range(10)), 1, 28, 28,
                         (0.1307,), (0.3081,)),
}
_TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "fashion_mnist": 60000, "mnist": 60000}
_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "cifar10": DatasetConfig,
    "cifar100": DatasetConfig,
    "fashion_mnist": DatasetConfig,
    "mnist": DatasetConfig,
    "synthetic": SyntheticConfig,
}


def available() -> list[str]:
    return sorted(_SCHEMAS)


def schema_for(name: str) -> type[DatasetConfig]:
    check_choice("dataset.name", name, available())
    return _SCHEMAS[name]


def _coerce(cfg: DatasetConfig) -> DatasetConfig:
    """A plain DatasetConfig named "synthetic" becomes a SyntheticConfig with default extras."""
    schema = schema_for(cfg.name)
    if type(cfg) is schema:
        return cfg
    return schema(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def spec_for(cfg: DatasetConfig) -> DatasetSpec:
    """Shape, classes and normalization stats of a dataset, without reading any pixel data."""
    cfg = _coerce(cfg)
    if cfg.name == "synthetic":
        c, s = cfg.channels, cfg.image_size
        classes = tuple(f"class_{i}" for i in range(cfg.num_classes))
        return DatasetSpec("synthetic", classes, c, s, s, (0.5,) * c, (0.5,) * c)
    return _STATIC_SPECS[cfg.name]


# ------------------------------------------------------------------------------- loading


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W], contiguous, CPU
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device, non_blocking: bool = False) -> "Split":
        return Split(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))


@dataclass
class DataBundle:
    spec: DatasetSpec
    train: Split
    val: Split | None
    test: Split


def load_dataset(cfg: DatasetConfig, seed: int) -> DataBundle:
    """Load a whole dataset as uint8 tensors; the subset and the val split are drawn with
    torch.Generators seeded by `seed`, so the same seed always gives the same split."""
    cfg = _coerce(cfg)
    cfg.validate()
    spec = spec_for(cfg)
    root = Path(cfg.root).expanduser()
    if cfg.name in sources.IDX_LAYOUT:
        raw = sources.load_idx_dataset(cfg.name, root, cfg.download)
    elif cfg.name in sources.CIFAR:
        raw = sources.load_cifar(cfg.name, root, cfg.download)
    else:
        raw = _synthetic(cfg)
    if raw.classes is not None:
        if len(raw.classes) != spec.num_classes:
            raise ConfigError(
                f"dataset {cfg.name}: the meta file under {root} lists {len(raw.classes)} class "
                f"names, expected {spec.num_classes}; it is corrupted or from another dataset. "
                f"Delete the dataset folder and download it again (dataset.download=true)."
            )
        spec = dataclasses.replace(spec, classes=raw.classes)
    shape = (spec.channels, spec.height, spec.width)
    for split, images, labels in (("train", raw.train_images, raw.train_labels),
                                  ("test", raw.test_images, raw.test_labels)):
        if tuple(images.shape[1:]) != shape:
            raise ConfigError(f"dataset {cfg.name}: {split} images are {tuple(images.shape[1:])}, "
                              f"expected {shape}; the files under {root} are not {cfg.name}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise ConfigError(
                f"dataset {cfg.name}: {split} labels range over {int(labels.min())}..{int(labels.max())}, "
                f"expected 0..{spec.num_classes - 1}; the label file under {root} is corrupted "
                f"or from another dataset: delete it and download again (dataset.download=true)"
            )

    train_gen = _generator(seed, 0)
    pool = Split(raw.train_images, raw.train_labels)
    if cfg.subset is not None and cfg.subset < len(pool):
        pool = _take(pool, torch.randperm(len(pool), generator=train_gen)[: cfg.subset])
    n_val = _val_count(cfg.val_split, len(pool))
    if n_val >= len(pool):
        raise ConfigError(
            f"dataset.val_split={cfg.val_split!r} holds out {n_val} of the {len(pool)} training "
            f"examples and leaves none for training; lower it"
            + (" or raise dataset.subset" if cfg.subset else "")
        )
    val = None
    train = pool
    if n_val:
        perm = torch.randperm(len(pool), generator=train_gen)
        val, train = _take(pool, perm[:n_val]), _take(pool, perm[n_val:])
    test = Split(raw.test_images, raw.test_labels)
    if cfg.subset is not None and cfg.subset < len(test):
        test = _take(test, torch.randperm(len(test), generator=_generator(seed, 1))[: cfg.subset])
    return DataBundle(spec, _contiguous(train), None if val is None else _contiguous(val), _contiguous(test))


def _val_count(val_split: float, pool: int) -> int:
    if val_split >= 1:
        return int(val_split)
    if val_split <= 0:
        return 0
    # at least one example when a fraction is asked for, rounding otherwise
    return max(1, int(round(val_split * pool)))


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent generators per use (subset+val, test subset) from one user seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % 2**63)


def _take(split: Split, index: torch.Tensor) -> Split:
    index = index.sort().values  # keep the file order: better locality, stable across seeds
    return Split(split.images[index], split.labels[index])


def _contiguous(split: Split) -> Split:
    return Split(split.images.contiguous(), split.labels.to(torch.int64).contiguous())


def _synthetic(cfg: SyntheticConfig) -> sources.RawData:
    """Each class: a smooth random prototype (a 4x4 random grid upsampled, so it survives
    pooling and crops) plus per-pixel Gaussian noise. Labels are balanced, then shuffled."""
    g = torch.Generator().manual_seed(int(cfg.seed) % 2**63)
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.rand(k, c, 4, 4, generator=g) * 255
    prototypes = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        noise = torch.randn(n, c, s, s, generator=g) * (cfg.noise * 255)
        images = (prototypes[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return images, labels

    train_x, train_y = make(cfg.train_size)
    test_x, test_y = make(cfg.test_size)
    return sources.RawData(train_x, train_y, test_x, test_y)
