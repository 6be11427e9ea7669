"""Datasets kept as image files: Tiny ImageNet and any torchvision-ImageFolder tree.

Listing and parsing here read no pixels (one image header at most), so they are cheap enough for
spec_for; the images are decoded later, by the FileSplits loading returns (through the on-disk
cache of cache.py). Both datasets are registered at the bottom. Every problem a user can fix is a ConfigError that
names the file or folder and says what to do.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

from cnnlab.checks import ConfigError, check_range, is_whole
from cnnlab.data import sources
from cnnlab.data.cache import CACHE_DIR, ImageCache
from cnnlab.data.images import IMAGE_EXTENSIONS, is_image
from cnnlab.data.registry import DatasetConfig, DatasetSpec, Loaded, register_dataset
from cnnlab.data.splits import FileSplit

log = logging.getLogger("cnnlab")


@dataclass
class FolderFiles:
    """A dataset as listed from disk: file paths and labels, nothing decoded."""

    classes: tuple[str, ...]
    train_paths: list[Path]
    train_labels: torch.Tensor  # int64 [N]
    test_paths: list[Path]
    test_labels: torch.Tensor
    val_paths: list[Path] | None = None  # a validation split given as files (image_folder's val/ beside test/)
    val_labels: torch.Tensor | None = None


def _labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _scan(folder: Path, recursive: bool) -> list[Path]:
    """Image files under folder in torchvision ImageFolder's order (sorted walk, sorted names).
    Hidden files and hidden sub-folders (.ipynb_checkpoints, .DS_Store) are skipped."""
    if not recursive:
        with os.scandir(folder) as entries:  # d_type from the listing: no stat per file
            return sorted(Path(e.path) for e in entries if e.is_file() and is_image(Path(e.name)))
    walk = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prunes the walk: only before it goes on
        walk.append((here, files))
    return [Path(here, f) for here, files in sorted(walk) for f in sorted(files) if is_image(Path(f))]


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


# --------------------------------------------------------------------------- Tiny ImageNet

TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_NUM_CLASSES = 200
TINY_TRAIN_SIZE = 100_000  # 500 per class
TINY_SIZE = (64, 64)
TINY_MEAN = (0.4802, 0.4481, 0.3975)  # the commonly used Tiny ImageNet training-set stats
TINY_STD = (0.2770, 0.2691, 0.2821)
_TINY_LAYOUT = (
    "wnids.txt (the 200 class ids), words.txt (their names), train/<wnid>/images/<wnid>_<i>.JPEG "
    "and val/images/val_<i>.JPEG with val/val_annotations.txt (the val labels)"
)


def _tiny_missing(folder: Path) -> list[str]:
    needed = {"wnids.txt": folder / "wnids.txt", "train/": folder / "train",
              "val/val_annotations.txt": folder / "val" / "val_annotations.txt",
              "val/images/": folder / "val" / "images"}
    return [name for name, path in needed.items() if not path.exists()]


def _tiny_not_found(root: Path, download: bool, download_error: str | None) -> ConfigError:
    folder = root / TINY_FOLDER
    state = (f"{folder} lacks {', '.join(_tiny_missing(folder))}" if folder.is_dir()
             else f"folder {folder} does not exist")
    msg = f"dataset tiny_imagenet: {state}. It must hold {_TINY_LAYOUT}, as in the official zip. "
    if download_error:
        msg += f"Downloading {TINY_URL} with torchvision failed: {download_error}. "
    if download:
        msg += f"Download {TINY_URL} yourself and extract it into {root} (dataset.root)."
    else:
        msg += (f"Set dataset.download=true to download {TINY_URL} (237 MB) with torchvision, "
                f"or download and extract it into {root} (dataset.root) yourself.")
    return ConfigError(msg)


def _tiny_folder(root: Path, download: bool) -> Path:
    """root/tiny-imagenet-200, downloaded first when parts are missing and download is allowed."""
    folder = root / TINY_FOLDER
    download_error = None
    if _tiny_missing(folder) and download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(TINY_URL, download_root=str(root), md5=TINY_MD5, remove_finished=True)
        except Exception as exc:  # no network, HTTP error, bad checksum: all end in the same advice
            download_error = sources.one_line(exc)
    if _tiny_missing(folder):
        raise _tiny_not_found(root, download, download_error)
    return folder


def _read_wnids(path: Path) -> list[str]:
    """Sorted wnids: the class order torchvision's ImageFolder gives on train/."""
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(wnids) < 2:
        raise ConfigError(f"{path} lists {len(wnids)} class id(s); it should list one wnid a line "
                          f"(200 in Tiny ImageNet). Extract the official zip again.")
    dupes = sorted(w for w, count in Counter(wnids).items() if count > 1)
    if dupes:
        raise ConfigError(f"{path} lists {', '.join(dupes[:5])} more than once; extract the official zip again")
    return sorted(wnids)


def _class_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """First name in words.txt per wnid ("n01443537\tgoldfish, Carassius auratus" -> goldfish)."""
    names: dict[str, str] = {}
    words = folder / "words.txt"
    if words.is_file():
        wanted = set(wnids)
        for line in words.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                names[wnid] = text.split(",")[0].strip()
    else:
        log.info("dataset tiny_imagenet: %s is missing; the wnids serve as class names", words)
    return tuple(names.get(w, w) for w in wnids)


def tiny_imagenet_classes(root: Path, download: bool) -> tuple[str, ...] | None:
    """Class names in label order, from wnids.txt and words.txt; None when the files are not there
    yet but will be downloaded (load_dataset does that). Missing files without download: ConfigError."""
    folder = root / TINY_FOLDER
    if not (folder / "wnids.txt").is_file():
        if download:
            return None
        raise _tiny_not_found(root, download, None)
    return _class_names(folder, _read_wnids(folder / "wnids.txt"))


def load_tiny_imagenet(root: Path, download: bool) -> FolderFiles:
    """Tiny ImageNet's files: train/ as the training pool and the labelled val/ as the test set
    (its test/ has no labels). Val labels come from val_annotations.txt: the images all lie in one
    folder, val/images/, so an ImageFolder on val/ sees one class and scores ~0.5%."""
    folder = _tiny_folder(root, download)
    wnids = _read_wnids(folder / "wnids.txt")
    label_of = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise ConfigError(f"dataset tiny_imagenet: {images} does not exist, yet wnids.txt lists {wnid}; "
                              f"every class needs train/<wnid>/images/. Extract the official zip again.")
        files = _scan(images, recursive=False)
        if not files:
            raise ConfigError(f"dataset tiny_imagenet: {images} holds no images (expected {wnid}_<i>.JPEG); "
                              f"extract the official zip again")
        train_paths += files
        train_labels += [label] * len(files)

    annotations = folder / "val" / "val_annotations.txt"
    val_images = folder / "val" / "images"
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ConfigError(f"{annotations} line {number} ({line[:60]!r}) is not "
                              f"'<file>\\t<wnid>\\t<box>'; extract the official zip again")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise ConfigError(f"{annotations} line {number} labels {name} as {wnid}, which wnids.txt does not "
                              f"list; the annotations and wnids.txt come from different copies: "
                              f"extract the official zip again")
        path = val_images / name
        if not path.is_file():
            raise ConfigError(f"{annotations} line {number} names {path}, which does not exist; "
                              f"extract the official zip again")
        test_paths.append(path)
        test_labels.append(label_of[wnid])
    if not test_paths:
        raise ConfigError(f"{annotations} labels no images; extract the official zip again")
    return FolderFiles(_class_names(folder, wnids), train_paths, _labels(train_labels),
                       test_paths, _labels(test_labels))


# --------------------------------------------------------------------------- ImageFolder trees

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale: ImageNet's stats through the luma weights (0.299, 0.587, 0.114) the decoder uses for gray.
IMAGENET_GRAY_MEAN = (0.459,)
IMAGENET_GRAY_STD = (0.226,)
_FOLDER_LAYOUT = ("train/<class>/ and val/<class>/ and/or test/<class>/ folders of images "
                  "(torchvision ImageFolder layout)")


def image_folder_classes(root: Path) -> list[str]:
    """Sorted class folder names of root/train, after checking the layout (no image read)."""
    if not root.is_dir():
        raise ConfigError(f"dataset image_folder: dataset.root={root} does not exist or is not a folder; "
                          f"it must hold {_FOLDER_LAYOUT}")
    train = root / "train"
    if not train.is_dir():
        present = _class_dirs(root)
        raise ConfigError(f"dataset image_folder: {root} has no train/ folder (it holds: "
                          f"{', '.join(present) or 'no folders'}); it must hold {_FOLDER_LAYOUT}")
    classes = _class_dirs(train)
    if len(classes) < 2:
        raise ConfigError(f"dataset image_folder: {train} holds {len(classes)} class folder(s)"
                          f"{' (' + ', '.join(classes) + ')' if classes else ''}; a classifier needs at least 2: "
                          f"put each class's images into train/<class>/")
    if not any((root / s).is_dir() for s in ("val", "test")):
        raise ConfigError(f"dataset image_folder: {root} has neither val/ nor test/; put the held-out images "
                          f"into val/<class>/ or test/<class>/ (same class names as train/) to score the model")
    return classes


def first_image_size(root: Path, classes: Sequence[str]) -> tuple[int, int]:
    """(height, width) of the first training image, from its header (PIL decodes no pixels here)."""
    from PIL import Image, UnidentifiedImageError

    folder = root / "train" / classes[0]
    path = next(iter(_scan(folder, recursive=True)), None)
    if path is None:
        raise ConfigError(f"dataset image_folder: class folder {folder} holds no images "
                          f"(extensions: {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable image ({err}); delete or replace it") from None
    return height, width


def _list_split(folder: Path, classes: list[str], every_class: bool) -> tuple[list[Path], torch.Tensor]:
    """Images of folder/<class>/... with labels by the train/ class order."""
    label_of = {c: i for i, c in enumerate(classes)}
    present = _class_dirs(folder)
    unknown = [c for c in present if c not in label_of]
    if unknown:
        raise ConfigError(f"dataset image_folder: {folder} has class folder(s) {', '.join(unknown)} that train/ "
                          f"lacks; the known classes are: {', '.join(classes)}")
    paths: list[Path] = []
    labels: list[int] = []
    for name in present if not every_class else classes:
        class_dir = folder / name
        if every_class and not class_dir.is_dir():  # cannot happen for train/ (classes come from it)
            raise ConfigError(f"dataset image_folder: {class_dir} is missing")
        files = _scan(class_dir, recursive=True)
        if not files and every_class:
            raise ConfigError(f"dataset image_folder: class folder {class_dir} holds no images "
                              f"(extensions: {', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        paths += files
        labels += [label_of[name]] * len(files)
    if not paths:
        raise ConfigError(f"dataset image_folder: {folder} holds no images in its class folders "
                          f"({', '.join(present) or 'none'}); put images into {folder}/<class>/")
    return paths, _labels(labels)


def load_image_folder(root: Path) -> FolderFiles:
    """train/ is the training pool. The test set is test/ when present, else val/. With both,
    val/ is the validation split as given; otherwise validation is carved from train/."""
    classes = image_folder_classes(root)
    train_paths, train_labels = _list_split(root / "train", classes, every_class=True)
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    test_paths, test_labels = _list_split(root / ("test" if has_test else "val"), classes, every_class=False)
    files = FolderFiles(tuple(classes), train_paths, train_labels, test_paths, test_labels)
    if has_val and has_test:
        files.val_paths, files.val_labels = _list_split(root / "val", classes, every_class=False)
    return files


# --------------------------------------------------------------------------- configs and registration

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
        if not is_whole(self.channels) or self.channels not in (1, 3):
            raise ConfigError(f"{prefix}.channels={self.channels!r} must be 3 (RGB) or 1 (grayscale)")
        size = self.image_size
        if size is not None:
            sides = list(size) if isinstance(size, (list, tuple)) else [size]
            if len(sides) not in (1, 2) or any(not is_whole(v) for v in sides):
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
        mean = self.mean or (IMAGENET_GRAY_MEAN if gray else IMAGENET_MEAN)
        std = self.std or (IMAGENET_GRAY_STD if gray else IMAGENET_STD)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


MAX_IMAGE_SIZE = 4096  # pixels per side; larger is surely a typo (one 4096^2 RGB image is 50 MB)


def tiny_imagenet_spec(cfg: TinyImageNetConfig) -> DatasetSpec:
    # class names from wnids.txt/words.txt; placeholders until a pending download brings them
    classes = tiny_imagenet_classes(Path(cfg.root).expanduser(), cfg.download)
    classes = classes or tuple(f"class_{i}" for i in range(TINY_NUM_CLASSES))
    return DatasetSpec("tiny_imagenet", classes, 3, *TINY_SIZE, TINY_MEAN, TINY_STD)


def image_folder_spec(cfg: ImageFolderConfig) -> DatasetSpec:
    root = Path(cfg.root).expanduser()
    classes = image_folder_classes(root)
    height, width = cfg.size() or first_image_size(root, classes)
    mean, std = cfg.stats()
    return DatasetSpec("image_folder", tuple(classes), cfg.channels, height, width, mean, std)


def load_files(cfg: TinyImageNetConfig | ImageFolderConfig, spec: DatasetSpec) -> Loaded:
    """FileSplits that decode on demand (or through the on-disk cache)."""
    root = Path(cfg.root).expanduser()
    files = load_tiny_imagenet(root, cfg.download) if isinstance(cfg, TinyImageNetConfig) else load_image_folder(root)
    size = (spec.height, spec.width)

    def split(name: str, paths: list[Path], labels: torch.Tensor) -> FileSplit:
        cache = ImageCache(root / CACHE_DIR, f"{cfg.name}-{name}", paths, spec.channels, size) if cfg.cache else None
        return FileSplit(paths, labels, spec.channels, size, cache)

    val = None
    if files.val_paths is not None:
        val = split("val", files.val_paths, files.val_labels)
        if cfg.val_split:
            log.info("dataset %s: %s is the validation split; dataset.val_split=%s is ignored",
                     cfg.name, root / "val", cfg.val_split)
    return Loaded(split("train", files.train_paths, files.train_labels),
                  split("test", files.test_paths, files.test_labels), val, files.classes)


register_dataset("tiny_imagenet", schema=TinyImageNetConfig, spec=tiny_imagenet_spec, load=load_files,
                 train_size=TINY_TRAIN_SIZE)
register_dataset("image_folder", schema=ImageFolderConfig, spec=image_folder_spec, load=load_files)
