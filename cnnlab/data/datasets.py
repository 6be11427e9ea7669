"""Dataset configs (OmegaConf schemas), static specs, and loading into uint8 tensors.

The chain is: DatasetConfig -> spec_for (shape, classes, mean/std, no pixels read) ->
load_dataset (whole splits as uint8 [N, C, H, W] CPU tensors, ready to move to the device).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data import folders, sources
from cnnlab.data.images import read_image, read_into

log = logging.getLogger("cnnlab")

# ------------------------------------------------------------------------------- configs

LOADERS = ("auto", "resident", "streaming")


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
    # resident: whole splits live on the training device as uint8 (fastest); streaming: batches come
    # through a DataLoader with workers (data larger than device memory); auto: resident when it fits
    loader: str = "auto"
    num_workers: Optional[int] = None  # streaming DataLoader workers; null = min(8, cores) for image files, 0 in memory

    def validate(self, prefix: str = "dataset") -> None:
        check_choice(f"{prefix}.name", self.name, available())
        check_choice(f"{prefix}.loader", self.loader, LOADERS)
        if self.num_workers is not None:
            if isinstance(self.num_workers, bool) or not _is_int(self.num_workers):
                raise ConfigError(f"{prefix}.num_workers={self.num_workers!r} must be a whole number >= 0 or null")
            check_range(f"{prefix}.num_workers", self.num_workers, 0)
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


@dataclass
class TinyImageNetConfig(DatasetConfig):
    """Tiny ImageNet: 100000 train / 10000 labelled val 64x64 colour images, 200 classes.
    Its val/ set (labels from val_annotations.txt) is cnnlab's test split."""

    name: str = "tiny_imagenet"
    cache: bool = True  # keep decoded images in root/.cnnlab-cache (about 1.4 GB) so later runs start fast

    def validate(self, prefix: str = "dataset") -> None:
        if not isinstance(self.cache, bool):
            raise ConfigError(f"{prefix}.cache={self.cache!r} must be true or false")
        super().validate(prefix)


@dataclass
class ImageFolderConfig(DatasetConfig):
    """Any root/train/<class>/ + val/<class>/ and/or test/<class>/ tree of image files."""

    name: str = "image_folder"
    root: str = "???"  # no default location: the user's own folder
    download: bool = False  # nothing to download
    image_size: Any = None  # int (square) or [height, width]; null = the first training image's size
    channels: int = 3  # 3 = RGB, 1 = grayscale; every image is converted to it
    mean: Optional[List[float]] = None  # per channel; null = ImageNet's stats (their luma for 1 channel)
    std: Optional[List[float]] = None
    cache: bool = True  # keep decoded images in root/.cnnlab-cache so later runs start fast

    def validate(self, prefix: str = "dataset") -> None:
        if isinstance(self.channels, bool) or not _is_int(self.channels) or self.channels not in (1, 3):
            raise ConfigError(f"{prefix}.channels={self.channels!r} must be 3 (RGB) or 1 (grayscale)")
        size = self.image_size
        if size is not None:
            sides = list(size) if isinstance(size, (list, tuple)) else [size]
            if len(sides) not in (1, 2) or any(isinstance(v, bool) or not _is_int(v) for v in sides):
                raise ConfigError(f"{prefix}.image_size={size!r} must be one whole number (square), "
                                  f"[height, width] or null (the first training image's size)")
            for side in sides:
                check_range(f"{prefix}.image_size", side, 1, MAX_IMAGE_SIZE)
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is None:
                continue
            if (not isinstance(values, (list, tuple)) or len(values) != self.channels
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)):
                raise ConfigError(f"{prefix}.{key}={values!r} must be a list of {self.channels} number(s), "
                                  f"one per channel ({prefix}.channels={self.channels}), or null")
            for i, v in enumerate(values):
                if key == "std":
                    check_range(f"{prefix}.std[{i}]", v, 0, low_inclusive=False)
                else:
                    check_range(f"{prefix}.mean[{i}]", v, 0, 1)
        if not isinstance(self.cache, bool):
            raise ConfigError(f"{prefix}.cache={self.cache!r} must be true or false")
        super().validate(prefix)

    def size(self) -> tuple[int, int] | None:
        if self.image_size is None:
            return None
        sides = list(self.image_size) if isinstance(self.image_size, (list, tuple)) else [self.image_size] * 2
        return int(sides[0]), int(sides[-1])

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        gray = self.channels == 1
        mean = self.mean or (folders.IMAGENET_GRAY_MEAN if gray else folders.IMAGENET_MEAN)
        std = self.std or (folders.IMAGENET_GRAY_STD if gray else folders.IMAGENET_STD)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


MAX_IMAGE_SIZE = 4096  # pixels per side; larger is surely a typo (one 4096^2 RGB image is 50 MB)


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
_TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "fashion_mnist": 60000, "mnist": 60000,
                "tiny_imagenet": folders.TINY_TRAIN_SIZE}
_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "cifar10": DatasetConfig,
    "cifar100": DatasetConfig,
    "fashion_mnist": DatasetConfig,
    "mnist": DatasetConfig,
    "synthetic": SyntheticConfig,
    "tiny_imagenet": TinyImageNetConfig,
    "image_folder": ImageFolderConfig,
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
    if cfg.name == "tiny_imagenet":
        # class names from wnids.txt/words.txt; placeholders until a pending download brings them
        classes = folders.tiny_imagenet_classes(Path(cfg.root).expanduser(), cfg.download)
        classes = classes or tuple(f"class_{i}" for i in range(folders.TINY_NUM_CLASSES))
        return DatasetSpec("tiny_imagenet", classes, 3, *folders.TINY_SIZE, folders.TINY_MEAN, folders.TINY_STD)
    if cfg.name == "image_folder":
        root = Path(cfg.root).expanduser()
        classes = folders.image_folder_classes(root)
        height, width = cfg.size() or folders.first_image_size(root, classes)
        mean, std = cfg.stats()
        return DatasetSpec("image_folder", tuple(classes), cfg.channels, height, width, mean, std)
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
class FileSplit:
    """A split kept as image files, decoded on demand: by DataLoader workers when streaming, or
    all at once by `load` for the resident path. Every image is read as `channels` x `size`."""

    paths: list[Path]
    labels: torch.Tensor  # int64 [N]
    channels: int
    size: tuple[int, int]  # (height, width) every image is framed to
    # Decoded images kept on disk across runs (load reads them from there); cache_index: where each of
    # these files sits in the cache's pool, so a subset or a val split shares the whole pool's cache.
    cache: Optional[folders.ImageCache] = field(default=None, repr=False)
    cache_index: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cache is not None and self.cache_index is None:
            self.cache_index = torch.arange(len(self.paths))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> torch.Tensor:
        """uint8 [C, H, W] of one image."""
        return read_image(self.paths[index], self.channels, self.size)

    def take(self, index: torch.Tensor) -> FileSplit:
        return FileSplit([self.paths[i] for i in index.tolist()], self.labels[index], self.channels, self.size,
                         self.cache, None if self.cache is None else self.cache_index[index])

    def head(self, n: int) -> Split:
        """The first n images decoded: the doctor's probe batch, feature-map panels."""
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


@dataclass
class DataBundle:
    spec: DatasetSpec
    train: Split | FileSplit
    val: Split | FileSplit | None
    test: Split | FileSplit


def load_dataset(cfg: DatasetConfig, seed: int) -> DataBundle:
    """Load a whole dataset as uint8 tensors (image-file datasets: as FileSplits, decoded later);
    the subset and the val split are drawn with torch.Generators seeded by `seed`, so the same
    seed always gives the same split."""
    cfg = _coerce(cfg)
    cfg.validate()
    spec = spec_for(cfg)
    root = Path(cfg.root).expanduser()
    if isinstance(cfg, (TinyImageNetConfig, ImageFolderConfig)):
        return _load_files(cfg, spec, root, seed)
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

    return _select(cfg, spec, Split(raw.train_images, raw.train_labels), Split(raw.test_images, raw.test_labels), seed)


def _select(cfg: DatasetConfig, spec: DatasetSpec, pool: Split | FileSplit, test: Split | FileSplit, seed: int,
            given_val: Split | FileSplit | None = None) -> DataBundle:
    """The seeded subset of the training pool and of the test set, and the val split: carved from
    the pool by dataset.val_split, or `given_val` (a dataset's own validation files) as it is."""
    train_gen = _generator(seed, 0)
    if cfg.subset is not None and cfg.subset < len(pool):
        pool = _take(pool, torch.randperm(len(pool), generator=train_gen)[: cfg.subset])
    val = None
    train = pool
    if given_val is not None:
        val = given_val
        if cfg.subset is not None and cfg.subset < len(val):
            val = _take(val, torch.randperm(len(val), generator=_generator(seed, 2))[: cfg.subset])
    else:
        n_val = _val_count(cfg.val_split, len(pool))
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
    return DataBundle(spec, _contiguous(train), None if val is None else _contiguous(val), _contiguous(test))


def _load_files(cfg: TinyImageNetConfig | ImageFolderConfig, spec: DatasetSpec, root: Path, seed: int) -> DataBundle:
    """Datasets of image files: FileSplits that decode on demand (or through the on-disk cache)."""
    if isinstance(cfg, TinyImageNetConfig):
        files = folders.load_tiny_imagenet(root, cfg.download)
    else:
        files = folders.load_image_folder(root)
    spec = dataclasses.replace(spec, classes=files.classes)  # tiny_imagenet: real names after a download
    size = (spec.height, spec.width)

    def split(name: str, paths: list[Path], labels: torch.Tensor) -> FileSplit:
        cache = (folders.ImageCache(root / folders.CACHE_DIR, f"{cfg.name}-{name}", paths, spec.channels, size)
                 if cfg.cache else None)
        return FileSplit(paths, labels, spec.channels, size, cache)

    given_val = None
    if files.val_paths is not None:
        given_val = split("val", files.val_paths, files.val_labels)
        if cfg.val_split:
            log.info("dataset %s: %s is the validation split; dataset.val_split=%s is ignored",
                     cfg.name, root / "val", cfg.val_split)
    return _select(cfg, spec, split("train", files.train_paths, files.train_labels),
                   split("test", files.test_paths, files.test_labels), seed, given_val)


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


def _take(split: Split | FileSplit, index: torch.Tensor) -> Split | FileSplit:
    index = index.sort().values  # keep the file order: better locality, stable across seeds
    if isinstance(split, FileSplit):
        return split.take(index)
    return Split(split.images[index], split.labels[index])


def _contiguous(split: Split | FileSplit) -> Split | FileSplit:
    if isinstance(split, FileSplit):
        return dataclasses.replace(split, labels=split.labels.to(torch.int64).contiguous())
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
