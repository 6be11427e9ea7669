"""Datasets kept as image files: Tiny ImageNet and any torchvision-ImageFolder tree.

Listing and parsing here read no pixels (one image header at most), so they are cheap enough for
spec_for. ImageCache keeps the decoded uint8 images of a pool of files on disk under the dataset
root, so only the first run pays for decoding. Every problem a user can fix is a ConfigError that
names the file or folder and says what to do.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.checks import ConfigError
from cnnlab.data import sources
from cnnlab.data.images import IMAGE_EXTENSIONS, is_image, read_into

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


# --------------------------------------------------------------------------- decoding and the cache


CACHE_DIR = ".cnnlab-cache"  # under the dataset root; safe to delete at any time
_CACHE_VERSION = 1
_CHUNK = 4096  # images copied out of the cache at a time: bounds the temporary memory


class ImageCache:
    """The decoded uint8 images of one pool of files (a training pool, a test set), kept on disk.

    Files in `folder`: <stem>.npy, uint8 [N, C, H, W], filled as images are first decoded (a subset
    run stores only its images; a later run decodes only what is still missing), and <stem>.crc.npy,
    int64 [N], each stored image's CRC-32 (-1: not stored yet). The stem holds a hash of the file list
    with sizes and mtimes, channels, size and the Pillow version (the decoder), so changed files get a fresh
    cache. Every image read back is checked against its CRC and decoded again on a mismatch: a
    corrupted cache is rebuilt, never trusted; a cache left by an older version of the files is
    removed when the new one is made. A lock file keeps a sweep's parallel jobs from filling it at
    once (the second waits, then reads). An unwritable folder means no cache, with a log line.
    """

    def __init__(self, folder: Path, name: str, paths: Sequence[Path], channels: int, size: tuple[int, int]):
        self.folder, self.name = Path(folder), name
        self.paths = list(paths)
        self.channels, self.size = channels, tuple(size)
        self._stem: str | None = None

    def stem(self) -> str:
        """<name>-<H>x<W>-c<C>-<hash>; the hash stats every file once (about 1 s per 100k files)."""
        if self._stem is None:
            from importlib.metadata import version

            h = hashlib.sha256(f"v{_CACHE_VERSION} {self.channels} {self.size} "
                               f"pillow {version('pillow')}\n".encode())
            for path in self.paths:
                try:
                    st = os.stat(path)
                except OSError as err:
                    raise ConfigError(f"{path} cannot be read ({err}); it was listed a moment ago: "
                                      f"is the dataset being changed?") from None
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            height, width = self.size
            self._stem = f"{self.name}-{height}x{width}-c{self.channels}-{h.hexdigest()[:20]}"
        return self._stem

    def load(self, index: torch.Tensor | np.ndarray | Sequence[int], threads: int | None = None) -> torch.Tensor:
        """uint8 [len(index), C, H, W]: pool images at `index`, from the cache where stored and checked."""
        index = np.asarray(index, dtype=np.int64)
        out = torch.empty(len(index), self.channels, *self.size, dtype=torch.uint8)
        stem = self.stem()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._locked(stem):
                self._fill(stem, index, out, threads)
        except OSError as err:  # read-only dataset folder, disk full: train anyway, uncached
            log.info("not caching decoded images of %s in %s (%s); every run decodes them",
                     self.name, self.folder, " ".join(str(err).split()))
            read_into(out, range(len(index)), [self.paths[i] for i in index], self.channels, self.size, threads)
        return out

    @contextmanager
    def _locked(self, stem: str) -> Iterator[None]:
        try:
            import fcntl  # POSIX only; elsewhere parallel jobs may decode the same images twice
        except ImportError:
            yield
            return
        with open(self.folder / f"{stem}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fill(self, stem: str, index: np.ndarray, out: torch.Tensor, threads: int | None) -> None:
        pixels_path, crc_path = self.folder / f"{stem}.npy", self.folder / f"{stem}.crc.npy"
        shape = (len(self.paths), self.channels, *self.size)
        pixels, fresh = self._open_pixels(pixels_path, shape)
        crcs = np.full(len(self.paths), -1, dtype=np.int64) if fresh else self._open_crcs(crc_path, len(self.paths))
        out_np = out.numpy()
        stored = np.flatnonzero(crcs[index] >= 0)
        bad = []
        for start in range(0, len(stored), _CHUNK):
            rows = stored[start : start + _CHUNK]
            out_np[rows] = pixels[index[rows]]
            bad += [k for k in rows.tolist() if zlib.crc32(out_np[k]) != crcs[index[k]]]
        if bad:
            log.warning("%d cached images in %s do not match their checksums (a corrupted cache); "
                        "decoding them again", len(bad), pixels_path)
        todo = np.sort(np.concatenate([np.flatnonzero(crcs[index] < 0), np.asarray(bad, dtype=np.int64)]))
        if not len(todo):
            return
        if len(todo) > 1000:
            log.info("decoding %d images of %s once; later runs read them from %s", len(todo), self.name, pixels_path)
        read_into(out, todo.tolist(), [self.paths[i] for i in index[todo]], self.channels, self.size, threads)
        for start in range(0, len(todo), _CHUNK):
            rows = todo[start : start + _CHUNK]
            pixels[index[rows]] = out_np[rows]
        pixels.flush()  # pixels reach the file before the checksums that vouch for them
        crcs[index[todo]] = [zlib.crc32(out_np[k]) for k in todo.tolist()]
        tmp = crc_path.with_name(f".{crc_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, crcs)
            os.replace(tmp, crc_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _open_pixels(self, path: Path, shape: tuple[int, ...]) -> tuple[np.memmap, bool]:
        """The pixel file as a writable memmap, and whether it was (re)created empty."""
        reason = None
        if path.exists():
            try:
                np.load(path, mmap_mode="r")  # "r" first: "r+" would silently extend a truncated file
                pixels = np.load(path, mmap_mode="r+")
                if pixels.shape == shape and pixels.dtype == np.uint8:
                    return pixels, False
                reason = f"it holds {pixels.dtype} {pixels.shape}, expected uint8 {shape}"
            except (ValueError, EOFError) as err:  # bad header, truncated file
                reason = " ".join(str(err).split())
            log.warning("image cache %s is unusable (%s); rebuilding it", path, reason)
            path.unlink()
        else:
            self._remove_stale(path.name[: -len(".npy")])
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape), True

    def _remove_stale(self, stem: str) -> None:
        """Caches of the same pool, size and channels under another hash were made for files that
        have changed since: each can be 1.4 GB, so they go when the new one is made."""
        prefix = stem.rsplit("-", 1)[0] + "-"
        for old in self.folder.glob(f"{prefix}*"):
            if not old.name.startswith(stem) and old.name[len(prefix):].split(".")[0].isalnum():
                log.info("removing the stale image cache %s (its files have changed)", old)
                old.unlink(missing_ok=True)

    @staticmethod
    def _open_crcs(path: Path, n: int) -> np.ndarray:
        try:
            crcs = np.load(path)
            if crcs.shape == (n,) and crcs.dtype == np.int64:
                return np.array(crcs)
            reason = f"it holds {crcs.dtype} {crcs.shape}, expected int64 ({n},)"
        except FileNotFoundError:
            return np.full(n, -1, dtype=np.int64)
        except (ValueError, EOFError) as err:  # a bad header, a truncated or pickled file
            reason = " ".join(str(err).split(". ")[0].split())
        log.warning("image cache checksums %s are unusable (%s); decoding every image again", path, reason)
        return np.full(n, -1, dtype=np.int64)
