"""Dataset loaders on small files written here in the real on-disk formats, plus the real
Fashion-MNIST that Debian installs (CI installs it; the test fails, not skips, without it)."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cnnlab.checks import ConfigError
from cnnlab.data import (
    DataBundle,
    DatasetConfig,
    DatasetSpec,
    SyntheticConfig,
    available,
    load_dataset,
    schema_for,
    spec_for,
)
from cnnlab.data import sources
from cnnlab.data.sources import CIFAR10_CLASSES, CIFAR100_CLASSES

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = sources.IDX_FILES


# ------------------------------------------------------------------------------- writers


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """The idx format: 0x0000, dtype 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, compresslevel=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, gz: bool, n_train=50, n_test=20, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


def _images_with_ids(start: int, n: int, rng) -> np.ndarray:
    """Random N x 3072 rows whose first two bytes encode a global example id."""
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    ids = np.arange(start, start + n)
    data[:, 0], data[:, 1] = ids // 256, ids % 256
    return data


def _dump(path: Path, obj) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are python2 pickles


def write_cifar10(root: Path, per_batch=20, n_test=30, meta_names=None, seed=0) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = _images_with_ids((i - 1) * per_batch, per_batch, rng)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(folder / f"data_batch_{i}",
              {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
               b"data": data, b"filenames": [b"x.png"] * per_batch})
        train_data.append(data)
        train_labels += labels
    test = _images_with_ids(1000, n_test, rng)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test})
    if meta_names is not None:
        _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in meta_names],
                                        b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return {"train": np.concatenate(train_data), "train_labels": np.array(train_labels),
            "test": test, "test_labels": np.array(test_labels), "folder": folder}


def write_cifar100(root: Path, n_train=200, n_test=50, seed=0) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {"folder": folder}
    for split, n in (("train", n_train), ("test", n_test)):
        data = _images_with_ids(0, n, rng)
        fine = [int(v) for v in np.arange(n) % 100]
        _dump(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                               b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                               b"data": data})
        out[split], out[f"{split}_labels"] = data, np.array(fine)
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
                            b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    return out


def ids(split) -> set[int]:
    """The example ids that _images_with_ids wrote into the first two bytes of each image."""
    flat = split.images.reshape(len(split), -1)[:, :2].to(torch.int64)
    return set((flat[:, 0] * 256 + flat[:, 1]).tolist())


def cfg(name, root, **kw) -> DatasetConfig:
    return DatasetConfig(name=name, root=str(root), download=kw.pop("download", False), **kw)


def assert_split_format(split, shape):
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert split.images.is_contiguous() and split.images.device.type == "cpu"
    assert tuple(split.images.shape[1:]) == shape
    assert len(split) == len(split.images) == len(split.labels)


# ------------------------------------------------------------------------------- registry, specs, config


def test_available_and_schemas():
    assert available() == ["cifar10", "cifar100", "custom", "fashion_mnist", "image_folder", "mnist", "synthetic",
                           "tiny_imagenet"]
    assert schema_for("synthetic") is SyntheticConfig
    assert schema_for("mnist") is DatasetConfig
    with pytest.raises(ConfigError, match=r"dataset\.name.*cifar10, cifar100, custom, fashion_mnist, image_folder, mnist, synthetic, tiny_imagenet"):
        schema_for("imagenet")


@pytest.mark.parametrize("name,shape,n,mean0", [
    ("cifar10", (3, 32, 32), 10, 0.4914), ("cifar100", (3, 32, 32), 100, 0.5071),
    ("mnist", (1, 28, 28), 10, 0.1307), ("fashion_mnist", (1, 28, 28), 10, 0.2860),
    ("synthetic", (3, 32, 32), 10, 0.5),
])
def test_spec_for_reads_no_files(tmp_path, name, shape, n, mean0):
    spec = spec_for(schema_for(name)(name=name, root=str(tmp_path / "nothing"), download=False))
    assert isinstance(spec, DatasetSpec)
    assert (spec.channels, spec.height, spec.width) == shape
    assert spec.num_classes == n == len(set(spec.classes))
    assert len(spec.mean) == len(spec.std) == spec.channels and spec.mean[0] == mean0
    assert not (tmp_path / "nothing").exists()


def test_class_names():
    assert spec_for(DatasetConfig(name="mnist")).classes == tuple("0123456789")
    fashion = spec_for(DatasetConfig(name="fashion_mnist")).classes
    assert fashion[0] == "T-shirt/top" and fashion[-1] == "Ankle boot"
    assert CIFAR100_CLASSES == tuple(sorted(CIFAR100_CLASSES)) and len(CIFAR100_CLASSES) == 100
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[-1] == "truck"


def test_config_through_omegaconf_schema():
    node = {"name": "cifar10", "val_split": 5000, "subset": 2000}
    c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_for("cifar10")), node))
    with pytest.raises(ConfigError, match=r"dataset\.val_split=5000.*leaves no training"):
        c.validate()  # 5000 of a 2000-example pool
    c.subset = None
    c.validate()
    s = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_for("synthetic")),
                                            {"name": "synthetic", "channels": 1, "image_size": 20}))
    s.validate()
    assert isinstance(s, SyntheticConfig) and spec_for(s).channels == 1 and spec_for(s).height == 20


@pytest.mark.parametrize("kw,match", [
    ({"val_split": -0.1}, r"dataset\.val_split=-0\.1 is out of range"),
    ({"val_split": 1.5}, r"dataset\.val_split=1\.5 is neither a fraction"),
    ({"val_split": 60000}, r"dataset\.val_split=60000 leaves no training examples.*60000"),
    ({"subset": 0}, r"dataset\.subset=0 is out of range"),
    ({"subset": 2.5}, r"dataset\.subset=2\.5 must be a whole number"),
    ({"name": "cifar"}, r"dataset\.name='cifar' is not valid; choose one of: cifar10"),
])
def test_config_errors(kw, match):
    c = DatasetConfig(**{"name": "mnist", **kw})
    with pytest.raises(ConfigError, match=match):
        c.validate()


# ------------------------------------------------------------------------------- CIFAR


def test_cifar10_loads_real_format(tmp_path):
    names = [n.upper() for n in CIFAR10_CLASSES]  # differ from the built-ins: must come from meta
    w = write_cifar10(tmp_path, meta_names=names)
    b = load_dataset(cfg("cifar10", tmp_path, val_split=0), seed=0)
    assert isinstance(b, DataBundle) and b.val is None
    assert b.spec.classes == tuple(names) and b.spec.num_classes == 10
    assert_split_format(b.train, (3, 32, 32))
    assert_split_format(b.test, (3, 32, 32))
    assert len(b.train) == 100 and len(b.test) == 30
    # rows are R(1024) G(1024) B(1024), each row-major 32x32
    assert torch.equal(b.train.images, torch.from_numpy(w["train"].reshape(-1, 3, 32, 32)))
    assert b.train.labels.tolist() == w["train_labels"].tolist()
    assert torch.equal(b.test.images, torch.from_numpy(w["test"].reshape(-1, 3, 32, 32)))
    assert b.test.labels.tolist() == w["test_labels"].tolist()
    assert int(b.train.labels.min()) >= 0 and int(b.train.labels.max()) <= 9


def test_cifar10_without_meta_uses_builtin_names(tmp_path):
    write_cifar10(tmp_path, meta_names=None)
    assert load_dataset(cfg("cifar10", tmp_path), seed=0).spec.classes == CIFAR10_CLASSES


@pytest.mark.parametrize("val_split,n_val", [(10, 10), (0.2, 20), (0.1, 10), (1, 1)])
def test_cifar10_val_split(tmp_path, val_split, n_val):
    write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    b = load_dataset(cfg("cifar10", tmp_path, val_split=val_split), seed=3)
    assert len(b.val) == n_val and len(b.train) == 100 - n_val and len(b.test) == 30
    assert_split_format(b.val, (3, 32, 32))
    assert ids(b.train).isdisjoint(ids(b.val))
    assert ids(b.train) | ids(b.val) == set(range(100))


def test_cifar10_split_is_seeded(tmp_path):
    write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    c = cfg("cifar10", tmp_path, val_split=0.2, subset=60)
    a, b, other = load_dataset(c, 7), load_dataset(c, 7), load_dataset(c, 8)
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).images, getattr(b, s).images)
        assert torch.equal(getattr(a, s).labels, getattr(b, s).labels)
    assert ids(a.val) != ids(other.val)


def test_cifar10_subset(tmp_path):
    write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES, n_test=50)
    b = load_dataset(cfg("cifar10", tmp_path, val_split=0.1, subset=30), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (27, 3, 30)
    assert ids(b.test) <= set(range(1000, 1050)) and len(ids(b.test)) == 30
    big = load_dataset(cfg("cifar10", tmp_path, val_split=0, subset=10_000), seed=0)
    assert (len(big.train), len(big.test)) == (100, 50)  # a cap, not a minimum


def test_cifar10_val_larger_than_pool_is_a_config_error(tmp_path):
    write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    with pytest.raises(ConfigError, match=r"val_split=100.*100 training examples"):
        load_dataset(cfg("cifar10", tmp_path, val_split=100), seed=0)


def test_cifar100_loads_real_format(tmp_path):
    w = write_cifar100(tmp_path)
    b = load_dataset(cfg("cifar100", tmp_path, val_split=50), seed=1)
    assert b.spec.num_classes == 100 and b.spec.classes == CIFAR100_CLASSES
    assert (len(b.train), len(b.val), len(b.test)) == (150, 50, 50)
    assert_split_format(b.train, (3, 32, 32))
    assert torch.equal(b.test.images, torch.from_numpy(w["test"].reshape(-1, 3, 32, 32)))
    assert b.test.labels.tolist() == w["test_labels"].tolist()
    labels = torch.cat([b.train.labels, b.val.labels])
    assert sorted(labels.tolist()) == sorted(w["train_labels"].tolist())  # fine labels, 0..99
    assert int(labels.max()) == 99


def test_cifar_truncated_pickle_is_corrupted(tmp_path):
    w = write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    path = w["folder"] / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"data_batch_3 is corrupted.*[Dd]elete"):
        load_dataset(cfg("cifar10", tmp_path), seed=0)


def test_cifar100_garbage_file_is_corrupted(tmp_path):
    w = write_cifar100(tmp_path)
    (w["folder"] / "test").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ConfigError, match=r"test is corrupted"):
        load_dataset(cfg("cifar100", tmp_path), seed=0)


def test_cifar_pickle_cannot_run_code(tmp_path):
    w = write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    _dump(w["folder"] / "data_batch_1", {b"data": Evil(), b"labels": []})
    with pytest.raises(ConfigError, match="corrupt"):
        load_dataset(cfg("cifar10", tmp_path), seed=0)
    assert not marker.exists()


def test_cifar_missing_folder_names_folder_and_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg("cifar10", tmp_path / "data"), seed=0)
    msg = str(err.value)
    for part in (str(tmp_path / "data" / "cifar-10-batches-py"), "data_batch_1", "data_batch_5",
                 "test_batch", "batches.meta", "dataset.download=true", "cifar-10-python.tar.gz"):
        assert part in msg
    with pytest.raises(ConfigError, match=r"cifar-100-python.*train, test.*meta.*dataset\.download=true"):
        load_dataset(cfg("cifar100", tmp_path), seed=0)


def test_cifar_missing_one_batch_named(tmp_path):
    w = write_cifar10(tmp_path, meta_names=CIFAR10_CLASSES)
    (w["folder"] / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match=r"lacks data_batch_4"):
        load_dataset(cfg("cifar10", tmp_path), seed=0)


# ------------------------------------------------------------------------------- MNIST idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    w = write_mnist(folder, gz)
    b = load_dataset(cfg("mnist", tmp_path, val_split=0), seed=0)
    assert b.spec.name == "mnist" and b.spec.classes == tuple("0123456789")
    assert_split_format(b.train, (1, 28, 28))
    assert_split_format(b.test, (1, 28, 28))
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(w["train-images-idx3-ubyte"]))
    assert b.train.labels.tolist() == w["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(b.test.images[:, 0], torch.from_numpy(w["t10k-images-idx3-ubyte"]))
    assert b.test.labels.tolist() == w["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_split_and_subset(tmp_path):
    write_mnist(tmp_path, gz=True)
    b = load_dataset(cfg("mnist", tmp_path, val_split=0.2, subset=15), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (12, 3, 15)


def test_fashion_mnist_in_root_wins_over_system_copy(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    b = load_dataset(cfg("fashion_mnist", tmp_path, val_split=0), seed=0)
    assert len(b.train) == 50 and b.spec.classes[0] == "T-shirt/top"


def _first_bytes_changed(path: Path, new: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(new + data[len(new):])


@pytest.mark.parametrize("damage,match", [
    ("magic", r"train-images-idx3-ubyte is corrupted \(bad magic number"),
    ("truncate", r"t10k-images-idx3-ubyte is corrupted \(\d+ bytes, expected"),
    ("short", r"train-labels-idx1-ubyte is corrupted \(only 3 bytes"),
])
def test_mnist_corrupted_raw(tmp_path, damage, match):
    write_mnist(tmp_path, gz=False)
    if damage == "magic":
        _first_bytes_changed(tmp_path / "train-images-idx3-ubyte", b"\x00\x00\x08\x01")
    elif damage == "truncate":
        p = tmp_path / "t10k-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:-100])
    else:
        (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ConfigError, match=match + r".*[Dd]elete it and download it again"):
        load_dataset(cfg("mnist", tmp_path), seed=0)


def test_mnist_corrupted_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])  # truncated download
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte\.gz is corrupted \(bad gzip"):
        load_dataset(cfg("mnist", tmp_path), seed=0)


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(49, np.uint8), gz=False)
    with pytest.raises(ConfigError, match=r"50 images but .*49 labels"):
        load_dataset(cfg("mnist", tmp_path), seed=0)


def test_mnist_missing_names_files_and_folders(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), gz=True)
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg("mnist", tmp_path), seed=0)
    msg = str(err.value)
    for part in (*IDX_NAMES, str(tmp_path), str(tmp_path / "MNIST" / "raw"),
                 "dataset.download=true", "lacks train-labels-idx1-ubyte"):
        assert part in msg


def test_mnist_download_uses_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeMNIST:  # what torchvision.datasets.MNIST(root, download=True) leaves on disk
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, download))
            write_mnist(Path(root) / "MNIST" / "raw", gz=False, n_train=30)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    b = load_dataset(cfg("mnist", tmp_path / "new", download=True, val_split=0), seed=0)
    assert calls == [(str(tmp_path / "new"), True)] and len(b.train) == 30
    load_dataset(cfg("mnist", tmp_path / "new", download=True), seed=0)
    assert len(calls) == 1  # found on disk the second time


def test_download_failure_is_a_config_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **kw):
            raise RuntimeError("Error downloading x.gz:\nTried https://example, got:\n<urlopen error>")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [])
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg("fashion_mnist", tmp_path, download=True), seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "failed: RuntimeError: Error downloading x.gz" in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and all(n in msg for n in IDX_NAMES)
    with pytest.raises(ConfigError, match=r"cifar-10-python\.tar\.gz with torchvision failed"):
        load_dataset(cfg("cifar10", tmp_path, download=True), seed=0)


# ------------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> DataBundle:
    missing = [f"{n}.gz" for n in IDX_NAMES if not (SYSTEM_FASHION / f"{n}.gz").is_file()]
    assert not missing, (
        f"{SYSTEM_FASHION} lacks {missing}: install Debian's fashion-mnist package "
        f"(CI does); this test must not be skipped"
    )
    return load_dataset(cfg("fashion_mnist", SYSTEM_FASHION, val_split=0), seed=0)  # the system copy, named


def test_real_fashion_mnist_from_system_copy(fashion):
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000) and fashion.val is None
    assert_split_format(fashion.train, (1, 28, 28))
    assert_split_format(fashion.test, (1, 28, 28))
    assert torch.bincount(fashion.train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels, minlength=10).tolist() == [1000] * 10
    assert fashion.spec.classes[9] == "Ankle boot"


def test_real_fashion_mnist_stats_match_spec(fashion):
    x = fashion.train.images.to(torch.float32).div_(255)
    assert abs(x.mean().item() - fashion.spec.mean[0]) < 1e-3
    assert abs(x.std().item() - fashion.spec.std[0]) < 1e-3


def test_real_fashion_mnist_split(tmp_path):
    b = load_dataset(cfg("fashion_mnist", SYSTEM_FASHION, val_split=5000), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)


# ------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_config():
    c = SyntheticConfig(num_classes=4, channels=1, image_size=20, train_size=100, test_size=40,
                        val_split=0.25)
    b = load_dataset(c, seed=0)
    assert b.spec.num_classes == 4 and (b.spec.channels, b.spec.height, b.spec.width) == (1, 20, 20)
    assert b.spec.mean == (0.5,) and b.spec.std == (0.5,)
    assert (len(b.train), len(b.val), len(b.test)) == (75, 25, 40)
    assert_split_format(b.train, (1, 20, 20))
    assert set(torch.cat([b.train.labels, b.val.labels]).tolist()) == {0, 1, 2, 3}
    d = load_dataset(SyntheticConfig(subset=50), seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (45, 5, 50)
    assert (d.spec.channels, d.spec.height) == (3, 32)


def test_synthetic_from_plain_config_named_synthetic():
    b = load_dataset(DatasetConfig(name="synthetic", val_split=0), seed=0)
    assert (len(b.train), len(b.test)) == (512, 256)


def test_synthetic_seeded():
    a = load_dataset(SyntheticConfig(seed=1), seed=0)
    b = load_dataset(SyntheticConfig(seed=1), seed=0)
    c = load_dataset(SyntheticConfig(seed=2), seed=0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.test.images, c.test.images)


def test_runs_with_other_seeds_split_a_dataset_read_once(monkeypatch):
    """A fused group's members with other seeds read the files once (load_dataset's read) and each gets
    exactly the split its own load gives."""
    from cnnlab.data import datasets
    calls = []
    real = datasets.entry

    class Counted:  # the registry's entry, its reads counted
        def __init__(self, name):
            self.entry = real(name)

        def __getattr__(self, key):
            return getattr(self.entry, key)

        def load(self, *args):
            calls.append(self.entry)
            return self.entry.load(*args)

    monkeypatch.setattr(datasets, "entry", Counted)
    read = {}
    shared = [load_dataset(SyntheticConfig(), seed=s, read=read) for s in (0, 1)]
    assert len(calls) == 1 and len(read) == 1
    own = [load_dataset(SyntheticConfig(), seed=s) for s in (0, 1)]
    for a, b in zip(shared, own):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(shared[0].val.labels, shared[1].val.labels)  # the seed draws the split


def test_synthetic_is_learnable():
    """Nearest class mean from the training split classifies the test split far above chance."""
    b = load_dataset(SyntheticConfig(num_classes=10, noise=0.25), seed=0)
    x = b.train.images.flatten(1).float()
    means = torch.stack([x[b.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(b.test.images.flatten(1).float(), means).argmin(1)
    assert (pred == b.test.labels).float().mean() > 0.9
    # and coarse: the class shows in 8x8-pooled images, so a pooling CNN can see it too
    pooled = torch.nn.functional.avg_pool2d(b.train.images.float(), 8).flatten(1)
    pmeans = torch.stack([pooled[b.train.labels == k].mean(0) for k in range(10)])
    tp = torch.nn.functional.avg_pool2d(b.test.images.float(), 8).flatten(1)
    assert (torch.cdist(tp, pmeans).argmin(1) == b.test.labels).float().mean() > 0.9


@pytest.mark.parametrize("key,value", [("num_classes", 1), ("channels", 0), ("image_size", 0),
                                       ("train_size", 0), ("noise", -1.0)])
def test_synthetic_config_errors(key, value):
    with pytest.raises(ConfigError, match=rf"dataset\.{key}="):
        SyntheticConfig(**{key: value}).validate()


def test_a_named_root_without_the_files_is_refused_not_swapped_for_the_system_copy(tmp_path):
    """dataset.root the user names is used or refused: the system Fashion-MNIST never stands in for it."""
    assert (SYSTEM_FASHION / "train-images-idx3-ubyte.gz").is_file(), "apt-get install -y dataset-fashion-mnist"
    named = DatasetConfig(name="fashion_mnist", root=str(tmp_path / "mine"), download=False)
    with pytest.raises(ConfigError) as err:
        load_dataset(named, seed=0)
    assert str(tmp_path / "mine") in str(err.value) and str(SYSTEM_FASHION) in str(err.value)
    assert "used only when dataset.root is left at its default" in str(err.value)
    default = DatasetConfig(name="fashion_mnist", download=False)  # the default root: the system copy may stand in
    assert default.root_is_default() and not named.root_is_default()
