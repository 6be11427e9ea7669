"""The datasets torchvision downloads, read from their original files: MNIST and Fashion-MNIST
(idx files), CIFAR-10 and CIFAR-100 (pickles). Each is registered at the bottom.

Everything here turns files into uint8 tensors in one pass (np.frombuffer, no per-sample
Python). Every problem a user can fix (missing folder, truncated download, wrong file) becomes
a ConfigError that names the file or folder and says what to do.
"""
from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from cnnlab.checks import ConfigError
from cnnlab.data.registry import DatasetSpec, Loaded, register_dataset
from cnnlab.data.splits import Split

# --------------------------------------------------------------------------- MNIST-style idx

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim

# Where each idx dataset's files are looked for: torchvision's layout under root, then system copies.
IDX_LAYOUT = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # root/<this>/raw
SYSTEM_DIRS: dict[str, list[Path]] = {
    "mnist": [],
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],  # Debian's fashion-mnist package
}


def _corrupted(path: Path, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{path} is corrupted ({why}). {fix}")


def _idx_file(folder: Path, name: str) -> Path | None:
    """The file `name` or `name.gz` in folder; the uncompressed one first (faster to read)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, fix: str) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise _corrupted(path, f"bad gzip data: {exc}", fix) from None
    return data


def read_idx(path: Path, kind: str, fix: str = "") -> np.ndarray:
    """Parse an idx file (gzipped or not). kind: "images" → uint8 [N, 1, H, W]; "labels" → uint8 [N]."""
    fix = fix or f"Delete {path} and download it again."
    data = _read_bytes(path, fix)
    magic, ndim = (_IDX_IMAGES_MAGIC, 3) if kind == "images" else (_IDX_LABELS_MAGIC, 1)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupted(path, f"only {len(data)} bytes, shorter than the idx header", fix)
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise _corrupted(
            path, f"bad magic number {found:#010x}, expected {magic:#010x} for idx {kind}", fix
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise _corrupted(
            path, f"{len(data)} bytes, expected {expected} for {' x '.join(map(str, dims))} values", fix
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    return array.reshape(dims[0], 1, dims[1], dims[2]) if kind == "images" else array


def idx_search_dirs(name: str, root: Path, system: bool = True) -> list[Path]:
    """Where the idx files are looked for: root, torchvision's layout under it, and the system copies
    (only when `system`: dataset.root left at its default)."""
    return [root, root / IDX_LAYOUT[name] / "raw", *(SYSTEM_DIRS.get(name, []) if system else [])]


def _find_idx_dir(name: str, root: Path, system: bool) -> tuple[Path | None, list[str]]:
    """First folder holding all four files; else notes on folders that hold only some."""
    partial = []
    for folder in idx_search_dirs(name, root, system):
        found = [f for f in IDX_FILES if _idx_file(folder, f) is not None]
        if len(found) == len(IDX_FILES):
            return folder, partial
        if found:
            missing = [f for f in IDX_FILES if f not in found]
            partial.append(f"{folder} has {', '.join(found)} but lacks {', '.join(missing)}")
    return None, partial


def load_idx_dataset(name: str, root: Path, download: bool, system: bool = False) -> Loaded:
    """mnist / fashion_mnist from the four idx files; download with torchvision if allowed. `system`:
    a system copy may stand in (dataset.root left at its default)."""
    folder, partial = _find_idx_dir(name, root, system)
    download_error = None
    if folder is None and download:
        try:
            _torchvision_download(name, root)
        except Exception as exc:  # no network, HTTP error, bad checksum: all end in the same advice
            download_error = one_line(exc)
        folder, partial = _find_idx_dir(name, root, system)
    if folder is None:
        raw_dir = root / IDX_LAYOUT[name] / "raw"
        places = " or ".join(str(p) for p in idx_search_dirs(name, root, system))
        msg = [f"dataset {name}: its four idx files were not found (looked in {places})."]
        unused = [str(d) for d in SYSTEM_DIRS.get(name, []) if not system and _find_idx_dir(name, d, False)[0]]
        if unused:
            msg.append(f"The system copy in {', '.join(unused)} is used only when dataset.root is left at its "
                       f"default; a folder you name is never swapped for another copy.")
        msg += [f"Note: {p}." for p in partial]
        if download_error:
            msg.append(f"Downloading them with torchvision into {raw_dir} failed: {download_error}.")
        msg.append(
            f"Put {', '.join(IDX_FILES)} (each may be gzipped, with .gz) into {root} "
            f"(dataset.root) or {raw_dir}"
        )
        msg[-1] += (
            ", e.g. copied from a machine with internet."
            if download
            else ", or set dataset.download=true to download them with torchvision (needs internet)."
        )
        raise ConfigError(" ".join(msg))
    fix = (
        f"Delete it and download it again (dataset.download=true downloads into "
        f"{root / IDX_LAYOUT[name] / 'raw'})."
    )
    if folder in SYSTEM_DIRS.get(name, []):
        fix = (
            f"It is a system copy: reinstall the package that provides {folder}, or put good "
            f"copies of the four files into {root} (dataset.root)."
        )
    paths = [_idx_file(folder, f) for f in IDX_FILES]
    arrays = [read_idx(p, "images" if "images" in p.name else "labels", fix) for p in paths]
    train_x, train_y, test_x, test_y = arrays
    for images, labels, ip, lp in ((train_x, train_y, paths[0], paths[1]), (test_x, test_y, paths[2], paths[3])):
        if len(images) != len(labels):
            raise ConfigError(
                f"dataset {name}: {ip} holds {len(images)} images but {lp} holds {len(labels)} labels; "
                f"one of them is corrupted or from another dataset. {fix}"
            )
    return Loaded(Split(torch.from_numpy(train_x.copy()), torch.from_numpy(train_y.astype(np.int64))),
                  Split(torch.from_numpy(test_x.copy()), torch.from_numpy(test_y.astype(np.int64))))


# --------------------------------------------------------------------------- CIFAR pickles

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels_key": b"labels",
        "names_key": b"label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

# A CIFAR pickle holds dicts, lists, bytes and numpy arrays; refuse anything else, so a
# stray or malicious file in dataset.root cannot run code when it is unpickled.
_NUMPY_GLOBALS = {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        numpy_ok = module.split(".")[0] == "numpy" and name in _NUMPY_GLOBALS
        if numpy_ok or (module, name) == ("_codecs", "encode"):  # python3 protocol-2 bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR file")


def _unpickle(path: Path, fix: str) -> dict:
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, ImportError, MemoryError, OverflowError) as exc:
        raise _corrupted(path, f"cannot be unpickled: {type(exc).__name__}: {exc}", fix) from None
    if not isinstance(obj, dict):
        raise _corrupted(path, f"holds a {type(obj).__name__}, not a dict", fix)
    return obj


def _get(d: dict, key: bytes):
    """CIFAR keys are bytes (python2 pickles); accept str keys from re-saved files too."""
    return d[key] if key in d else d.get(key.decode())


def _cifar_batch(path: Path, labels_key: bytes, fix: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, fix)
    data, labels = _get(batch, b"data"), _get(batch, labels_key)
    if data is None or labels is None:
        raise _corrupted(path, f"no b'data' or {labels_key!r} entry; keys: {list(batch)[:6]}", fix)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupted(path, f"data is {data.dtype} {data.shape}, expected uint8 N x 3072", fix)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise _corrupted(path, f"{len(data)} images but {labels.size} labels", fix)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: Path, download: bool) -> Loaded:
    info = CIFAR[name]
    folder = root / info["folder"]
    required = info["train"] + info["test"]

    def missing() -> list[str]:
        return [f for f in required if not (folder / f).is_file()]

    download_error = None
    if missing() and download:
        try:
            _torchvision_download(name, root)
        except Exception as exc:
            download_error = one_line(exc)
    if missing():
        files = ", ".join(required) + f" (and {info['meta']} for class names)"
        state = (
            f"{folder} lacks {', '.join(missing())}"
            if folder.is_dir()
            else f"folder {folder} does not exist"
        )
        msg = f"dataset {name}: {state}. It must hold {files}. "
        if download_error:
            msg += f"Downloading {info['url']} with torchvision failed: {download_error}. "
        if download:
            msg += f"Download {info['url']} yourself and extract it into {root} (dataset.root)."
        else:
            msg += (
                f"Set dataset.download=true to download {info['url']} with torchvision, "
                f"or download and extract it into {root} (dataset.root) yourself."
            )
        raise ConfigError(msg)
    fix = (
        f"Delete {folder} (and {root / Path(info['url']).name} if present) and download again "
        f"with dataset.download=true."
    )
    parts = {
        split: [_cifar_batch(folder / f, info["labels_key"], fix) for f in info[split]]
        for split in ("train", "test")
    }
    classes = None
    meta_path = folder / info["meta"]
    if meta_path.is_file():
        names = _get(_unpickle(meta_path, fix), info["names_key"])
        if names is None:
            raise _corrupted(meta_path, f"no {info['names_key']!r} entry", fix)
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    # torch.from_numpy on one concatenated array: a single copy of the pixels.
    def cat(split: str, i: int) -> torch.Tensor:
        arrays = [p[i] for p in parts[split]]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays) if len(arrays) > 1 else arrays[0]))

    return Loaded(Split(cat("train", 0), cat("train", 1)), Split(cat("test", 0), cat("test", 1)), classes=classes)


# --------------------------------------------------------------------------- download


def one_line(exc: Exception) -> str:
    """torchvision's download errors span lines; a ConfigError is printed as one paragraph."""
    return " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(". ")


# torchvision's dataset class for each dataset here; its download puts the files where the readers
# above look: root/MNIST/raw, root/FashionMNIST/raw, root/cifar-10-batches-py, ...
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _torchvision_download(name: str, root: Path) -> None:
    """Download (and extract) with torchvision's own dataset class."""
    import torchvision.datasets as tvd  # imported only here: slow to import, not needed otherwise

    root.mkdir(parents=True, exist_ok=True)
    getattr(tvd, TORCHVISION_CLASSES[name])(str(root), train=True, download=True)  # one file set holds both splits


# --------------------------------------------------------------------------- registration

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

SPECS = {
    "cifar10": DatasetSpec("cifar10", CIFAR10_CLASSES, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetSpec("cifar100", CIFAR100_CLASSES, 3, 32, 32,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": DatasetSpec("fashion_mnist", FASHION_MNIST_CLASSES, 1, 28, 28, (0.2860,), (0.3530,)),
    "mnist": DatasetSpec("mnist", tuple(str(d) for d in range(10)), 1, 28, 28, (0.1307,), (0.3081,)),
}
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000, "mnist": 60_000}


def _register(name: str, load) -> None:
    register_dataset(name, spec=lambda cfg: SPECS[name], train_size=TRAIN_SIZES[name], load=load)


for _name in IDX_LAYOUT:
    _register(_name, lambda cfg, spec, name=_name: load_idx_dataset(name, Path(cfg.root).expanduser(), cfg.download,
                                                                    system=cfg.root_is_default()))
for _name in CIFAR:
    _register(_name, lambda cfg, spec, name=_name: load_cifar(name, Path(cfg.root).expanduser(), cfg.download))
