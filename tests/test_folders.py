"""Image-file datasets (tiny_imagenet, image_folder) on small trees written here in the real on-disk
layouts. Every image is one solid class colour, so a label can be checked against its pixels."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnnlab.checks import ConfigError
from cnnlab.config import validate
from cnnlab.data import (
    FileSplit,
    ImageFolderConfig,
    Split,
    TinyImageNetConfig,
    available,
    build_pipeline,
    load_dataset,
    spec_for,
)
from cnnlab.data import folders
from cnnlab.data import images as images_module
from cnnlab.data.images import read_image
from cnnlab.build import prepare

from conftest import compose_config, run_cnnlab

# Distinct colours, far apart, so JPEG artefacts and resizing cannot move one onto another.
COLORS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 30)]
# wnids.txt order is not sorted in the real file: labels must follow the sorted order anyway.
WNIDS = ["n03444034", "n01443537", "n02099601"]
SORTED_WNIDS = sorted(WNIDS)
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02099601": "golden retriever",
         "n00001740": "entity"}  # n03444034 has no line: its wnid is its name


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Path:
    """A solid-colour image of size (height, width); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size[1], size[0]), color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_tiny(root: Path, per_class: int = 4, n_val: int = 6, n_test: int = 2) -> dict[str, str]:
    """root/tiny-imagenet-200 as in the official zip; returns val file name -> wnid."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\t{names}\n" for w, names in WORDS.items()))
    for wnid in WNIDS:
        color = COLORS[SORTED_WNIDS.index(wnid)]
        for i in range(per_class):
            write_image(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", color)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    labels = {}
    lines = []
    for i in range(n_val):
        wnid = WNIDS[(i * 2 + 1) % len(WNIDS)]  # not in class order
        name = f"val_{i}.JPEG"
        write_image(folder / "val" / "images" / name, COLORS[SORTED_WNIDS.index(wnid)])
        lines.append(f"{name}\t{wnid}\t0\t32\t44\t62\n")
        labels[name] = wnid
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    for i in range(n_test):  # no labels anywhere: must not show up in any split
        write_image(folder / "test" / "images" / f"test_{i}.JPEG", (128, 128, 128))
    return labels


def make_folder(root: Path, splits: dict[str, dict[str, int]], size=(40, 56)) -> Path:
    """root/<split>/<class>/img_<i>.png|jpg, mixed formats; class c gets COLORS[sorted index]."""
    classes = sorted({c for per in splits.values() for c in per})
    for split, per in splits.items():
        for name, count in per.items():
            for i in range(count):
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / split / name / f"img_{i}{suffix}", COLORS[classes.index(name)], size)
    return root


def color_labels(images: torch.Tensor) -> list[int]:
    """The class whose colour is nearest to each image's mean colour."""
    means = images.float().mean((2, 3))
    palette = torch.tensor(COLORS, dtype=torch.float32)[:, : images.shape[1]]
    if images.shape[1] == 1:  # gray images: compare with the colours' luma
        palette = (torch.tensor(COLORS, dtype=torch.float32) @ torch.tensor([0.299, 0.587, 0.114]))[:, None]
    return torch.cdist(means, palette).argmin(1).tolist()


def tiny_cfg(root: Path, **kw) -> TinyImageNetConfig:
    return TinyImageNetConfig(root=str(root), download=False, **kw)


def folder_cfg(root: Path, **kw) -> ImageFolderConfig:
    return ImageFolderConfig(root=str(root), **kw)


# ------------------------------------------------------------------------------- tiny_imagenet


def test_new_datasets_are_registered():
    assert {"tiny_imagenet", "image_folder"} <= set(available())


def test_tiny_imagenet_labels_names_and_splits(tmp_path):
    val_labels = make_tiny(tmp_path, per_class=4, n_val=6)
    cfg = tiny_cfg(tmp_path, val_split=3)
    spec = spec_for(cfg)
    # sorted wnids; first name from words.txt; the wnid itself without a words.txt line
    assert spec.classes == ("goldfish", "golden retriever", "n03444034")
    assert (spec.channels, spec.height, spec.width) == (3, 64, 64)
    assert spec.mean == (0.4802, 0.4481, 0.3975) and spec.std == (0.2770, 0.2691, 0.2821)

    data = load_dataset(cfg, seed=0)
    assert all(isinstance(s, FileSplit) for s in (data.train, data.val, data.test))
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)  # test = labelled val/, not test/
    # the test labels come from val_annotations.txt, and agree with the pixels
    test_names = [p.name for p in data.test.paths]
    assert [SORTED_WNIDS[y] for y in data.test.labels.tolist()] == [val_labels[n] for n in test_names]
    assert not any("test_" in p.name for s in (data.train, data.val, data.test) for p in s.paths)
    for split in (data.train, data.val, data.test):
        loaded = split.load()
        assert loaded.images.shape == (len(split), 3, 64, 64) and loaded.images.dtype == torch.uint8
        assert color_labels(loaded.images) == split.labels.tolist()
        assert split.labels.dtype == torch.int64
    # train labels follow the folder of each file
    assert all(p.parent.parent.name == SORTED_WNIDS[y] for p, y in zip(data.train.paths, data.train.labels.tolist()))


def test_tiny_imagenet_subset_and_seeded_selection(tmp_path):
    make_tiny(tmp_path, per_class=5, n_val=8)
    cfg = tiny_cfg(tmp_path, subset=10, val_split=0.2, cache=False)
    a, b, c = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    assert (len(a.train), len(a.val), len(a.test)) == (8, 2, 8)
    assert a.train.paths == b.train.paths and a.val.paths == b.val.paths
    assert (a.train.paths, a.val.paths) != (c.train.paths, c.val.paths)
    assert not set(a.train.paths) & set(a.val.paths)
    assert a.train.paths == sorted(a.train.paths)  # file order kept: locality
    small = load_dataset(tiny_cfg(tmp_path, subset=4, val_split=0, cache=False), seed=0)
    assert (len(small.train), small.val, len(small.test)) == (4, None, 4)


def test_file_split_load_equals_per_item_decoding(tmp_path):
    make_tiny(tmp_path)
    for cache in (False, True):
        data = load_dataset(tiny_cfg(tmp_path, val_split=2, cache=cache), seed=0)
        for split in (data.train, data.val, data.test):
            loaded = split.load(threads=2)
            assert isinstance(loaded, Split)
            assert torch.equal(loaded.images, torch.stack([split[i] for i in range(len(split))]))
            assert torch.equal(loaded.labels, split.labels)
        head = data.train.head(3)
        assert torch.equal(head.images, data.train.load().images[:3])


def test_tiny_imagenet_download_failure_says_what_and_where(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(url, download_root, **kw):
        assert url == folders.TINY_URL and kw.get("md5") == folders.TINY_MD5
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    cfg = TinyImageNetConfig(root=str(tmp_path / "data"), download=True)
    assert spec_for(cfg).num_classes == 200  # placeholders until the download brings the names
    with pytest.raises(ConfigError) as err:
        load_dataset(cfg, seed=0)
    msg = str(err.value)
    assert str(tmp_path / "data" / "tiny-imagenet-200") in msg and "wnids.txt" in msg
    assert "Downloading http://cs231n.stanford.edu/tiny-imagenet-200.zip with torchvision failed" in msg
    assert "name resolution" in msg and "extract it into" in msg


def _broken_tiny(tmp_path: Path, how: str) -> tuple[Path, str]:
    root = tmp_path / how
    make_tiny(root)
    folder = root / "tiny-imagenet-200"
    ann = folder / "val" / "val_annotations.txt"
    if how == "no_folder":
        return tmp_path / "empty", "tiny-imagenet-200 does not exist"
    if how == "no_wnids":
        (folder / "wnids.txt").unlink()
        return root, "lacks wnids.txt"
    if how == "no_annotations":
        ann.unlink()
        return root, "lacks val/val_annotations.txt"
    if how == "unknown_wnid":
        ann.write_text(ann.read_text() + "val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
        return root, "n09999999, which wnids.txt does not list"
    if how == "missing_val_file":
        ann.write_text(ann.read_text() + f"val_77.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
        return root, f"names {folder / 'val' / 'images' / 'val_77.JPEG'}, which does not exist"
    if how == "empty_class":
        for f in (folder / "train" / WNIDS[2] / "images").iterdir():
            f.unlink()
        return root, f"{folder / 'train' / WNIDS[2] / 'images'} holds no images"
    if how == "missing_class":
        (folder / "wnids.txt").write_text("\n".join(WNIDS + ["n04000000"]))
        return root, f"{folder / 'train' / 'n04000000' / 'images'} does not exist"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_folder", "no_wnids", "no_annotations", "unknown_wnid", "missing_val_file",
                                 "empty_class", "missing_class"])
def test_tiny_imagenet_errors_name_the_problem(tmp_path, how):
    root, expected = _broken_tiny(tmp_path, how)
    with pytest.raises(ConfigError) as err:
        load_dataset(tiny_cfg(root, val_split=1), seed=0)
    assert expected in str(err.value)


def test_unreadable_image_is_a_config_error_naming_it(tmp_path):
    make_tiny(tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = load_dataset(tiny_cfg(tmp_path, val_split=0), seed=0)
    with pytest.raises(ConfigError, match=str(bad)):
        data.train.load()


# ------------------------------------------------------------------------------- the cache


def _count_decodes(monkeypatch) -> list[Path]:
    calls: list[Path] = []

    def counting(path, channels, size=None):
        calls.append(Path(path))
        return read_image(path, channels, size)

    monkeypatch.setattr(images_module, "read_image", counting)  # what every batch decode calls
    return calls


def _cache_files(root: Path, split: str) -> tuple[Path, Path]:
    (pixels,) = [p for p in (root / folders.CACHE_DIR).glob(f"*-{split}-*.npy") if not p.name.endswith(".crc.npy")]
    return pixels, pixels.with_name(pixels.name[:-4] + ".crc.npy")


def test_cache_is_written_reused_and_rebuilt_when_corrupted(tmp_path, monkeypatch, caplog):
    make_tiny(tmp_path, per_class=4, n_val=6)
    cfg = tiny_cfg(tmp_path, val_split=2)
    calls = _count_decodes(monkeypatch)
    first = load_dataset(cfg, seed=0)
    reference = {name: getattr(first, name).load() for name in ("train", "val", "test")}
    assert len(calls) == 18  # every image once: train and val share the training pool's cache
    pixels, crcs = _cache_files(tmp_path, "train")
    assert pixels.name.startswith("tiny_imagenet-train-64x64-c3-")
    assert np.load(pixels).shape == (12, 3, 64, 64) and (np.load(crcs) >= 0).all()

    calls.clear()
    again = load_dataset(cfg, seed=0)
    for name, ref in reference.items():
        assert torch.equal(getattr(again, name).load().images, ref.images)
    assert calls == []  # all from the cache

    # bytes of one image overwritten in place: only that image is decoded again, and fixed on disk
    array = np.load(pixels, mmap_mode="r+")
    array[5] = 0
    array.flush()
    del array
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        fixed = load_dataset(cfg, seed=0)
        images = torch.cat([fixed.val.load().images, fixed.train.load().images])
    assert len(calls) == 1 and "do not match their checksums" in caplog.text
    assert torch.equal(images, torch.cat([reference["val"].images, reference["train"].images]))
    assert np.load(pixels)[5].any()

    # a truncated pixel file and a garbage checksum file are rebuilt, not trusted
    pixels.write_bytes(pixels.read_bytes()[:1000])
    (_cache_files(tmp_path, "test")[1]).write_bytes(b"garbage")
    calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        rebuilt = load_dataset(cfg, seed=0)
        for name, ref in reference.items():
            assert torch.equal(getattr(rebuilt, name).load().images, ref.images)
    assert len(calls) == 18 and "is unusable" in caplog.text
    assert np.load(pixels).shape == (12, 3, 64, 64)

    # a changed image file gives a new cache key, and the stale cache goes
    old_pixels, old_crcs = _cache_files(tmp_path, "test")
    touched = first.test.paths[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    calls.clear()
    load_dataset(cfg, seed=0).test.load()
    assert len(calls) == 6
    new_pixels, new_crcs = _cache_files(tmp_path, "test")
    assert new_pixels != old_pixels and not old_pixels.exists() and not old_crcs.exists() and new_crcs.exists()
    assert _cache_files(tmp_path, "train")[0] == pixels  # other pools' caches stay


def test_subset_runs_fill_the_shared_cache(tmp_path, monkeypatch):
    make_tiny(tmp_path, per_class=4, n_val=6)
    calls = _count_decodes(monkeypatch)
    small = load_dataset(tiny_cfg(tmp_path, subset=5, val_split=1), seed=3)
    small.train.load(), small.val.load()
    assert len(calls) == 5
    calls.clear()
    full = load_dataset(tiny_cfg(tmp_path, val_split=1), seed=3)
    full.train.load(), full.val.load()
    assert len(calls) == 12 - 5  # only what the subset run did not store


def test_cache_is_skipped_when_the_root_is_not_writable(tmp_path, caplog):
    make_tiny(tmp_path)
    data = load_dataset(tiny_cfg(tmp_path, val_split=0, cache=False), seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = folders.ImageCache(blocker / folders.CACHE_DIR, "x", data.test.paths, 3, (64, 64))
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        images = cache.load(torch.arange(len(data.test.paths)))
    assert "not caching decoded images of x" in caplog.text
    assert torch.equal(images, data.test.load().images)


# ------------------------------------------------------------------------------- image_folder


def test_image_folder_mixed_sizes_and_modes_framed_to_image_size(tmp_path):
    root = tmp_path / "data"
    make_folder(root, {"train": {"cat": 3, "dog": 3, "eel": 2}, "test": {"cat": 2, "eel": 1}})
    # mixed sizes and modes, nested folders; hidden files, hidden folders and non-images ignored
    write_image(root / "train" / "cat" / "nested" / "deep" / "big.png", COLORS[0], (120, 90))
    write_image(root / "train" / "dog" / "gray.png", COLORS[1], (30, 70), mode="L")
    write_image(root / "train" / "dog" / "rgba.png", COLORS[1], (64, 64), mode="RGBA")
    write_image(root / "train" / "dog" / "tiny.bmp", COLORS[1], (10, 12))
    write_image(root / "train" / "cat" / ".hidden.png", COLORS[2])
    write_image(root / "train" / "cat" / ".ipynb_checkpoints" / "img_0.png", COLORS[2])
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_text("")

    cfg = folder_cfg(root, image_size=[24, 32], val_split=0)
    spec = spec_for(cfg)
    assert spec.classes == ("cat", "dog", "eel")
    assert (spec.channels, spec.height, spec.width) == (3, 24, 32)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    data = load_dataset(cfg, seed=0)
    assert len(data.train) == 12 and len(data.test) == 3 and data.val is None
    assert not any(p.name.startswith(".") or ".ipynb" in str(p) or p.suffix == ".txt" for p in data.train.paths)
    loaded = data.train.load()
    assert loaded.images.shape == (12, 3, 24, 32)
    assert color_labels(loaded.images) == data.train.labels.tolist()
    assert color_labels(data.test.load().images) == data.test.labels.tolist() == [0, 0, 2]

    gray = load_dataset(folder_cfg(root, image_size=16, channels=1, val_split=0), seed=0)
    assert gray.spec.mean == (0.459,) and gray.spec.std == (0.226,)
    images = gray.train.load().images
    assert images.shape == (12, 1, 16, 16)
    assert color_labels(images) == gray.train.labels.tolist()


def test_image_folder_size_defaults_to_the_first_training_image(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=(30, 50))
    spec = spec_for(folder_cfg(root))
    assert (spec.height, spec.width) == (30, 50)
    custom = spec_for(folder_cfg(root, mean=[0.1, 0.2, 0.3], std=[1, 2, 3]))
    assert custom.mean == (0.1, 0.2, 0.3) and custom.std == (1.0, 2.0, 3.0)


def test_image_folder_val_and_test_mapping(tmp_path, caplog):
    counts = {"x": 5, "y": 5}
    only_val = make_folder(tmp_path / "v", {"train": counts, "val": {"x": 2, "y": 1}}, size=(16, 16))
    data = load_dataset(folder_cfg(only_val, val_split=2), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 3)  # test = val/, val carved
    assert all(p.parent.parent.name == "val" for p in data.test.paths)

    only_test = make_folder(tmp_path / "t", {"train": counts, "test": {"y": 2}}, size=(16, 16))
    data = load_dataset(folder_cfg(only_test, val_split=0.3), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (7, 3, 2)  # classes without test images: fine
    assert data.test.labels.tolist() == [1, 1]

    both = make_folder(tmp_path / "b", {"train": counts, "val": {"x": 3, "y": 3}, "test": {"x": 1, "y": 2}},
                       size=(16, 16))
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        data = load_dataset(folder_cfg(both, val_split=0.5), seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 6, 3)  # val/ as given, val_split ignored
    assert "dataset.val_split=0.5 is ignored" in caplog.text
    assert all(p.parent.parent.name == "val" for p in data.val.paths)
    assert color_labels(data.val.load().images) == data.val.labels.tolist()
    capped = load_dataset(folder_cfg(both, subset=4), seed=0)  # subset caps the given val split too
    assert (len(capped.train), len(capped.val), len(capped.test)) == (4, 4, 3)


def _broken_folder(tmp_path: Path, how: str) -> tuple[Path, dict, str]:
    root = tmp_path / how
    layout = {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}
    if how == "no_root":
        return root, {}, "does not exist or is not a folder"
    if how == "no_train":
        make_folder(root, {"val": layout["val"]})
        return root, {}, f"{root} has no train/ folder"
    if how == "one_class":
        make_folder(root, {"train": {"a": 3}, "val": {"a": 1}})
        return root, {}, "holds 1 class folder(s) (a); a classifier needs at least 2"
    if how == "no_val_or_test":
        make_folder(root, {"train": layout["train"]})
        return root, {}, "has neither val/ nor test/"
    if how == "empty_class":
        make_folder(root, layout)
        (root / "train" / "c").mkdir()
        (root / "train" / "c" / "readme.txt").write_text("no images here")
        return root, {"image_size": 8}, f"class folder {root / 'train' / 'c'} holds no images"
    if how == "empty_first_class":
        make_folder(root, layout)
        (root / "train" / "0_empty").mkdir()
        return root, {}, f"class folder {root / 'train' / '0_empty'} holds no images"
    if how == "unknown_val_class":
        make_folder(root, {**layout, "val": {"a": 1, "zebra": 1}})
        return root, {}, "class folder(s) zebra that train/ lacks; the known classes are: a, b"
    if how == "empty_test":
        make_folder(root, {"train": layout["train"]})
        (root / "test" / "a").mkdir(parents=True)
        return root, {}, f"{root / 'test'} holds no images"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_root", "no_train", "one_class", "no_val_or_test", "empty_class",
                                 "empty_first_class", "unknown_val_class", "empty_test"])
def test_image_folder_errors_name_the_problem(tmp_path, how):
    root, keys, expected = _broken_folder(tmp_path, how)
    with pytest.raises(ConfigError) as err:
        load_dataset(folder_cfg(root, **keys), seed=0)
    assert expected in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("dataset.image_size=0", "dataset.image_size=0 is out of range"),
    ("dataset.image_size=5000", "dataset.image_size=5000 is out of range"),
    ("dataset.image_size=[8,8,8]", "must be one whole number (square), [height, width] or null"),
    ("dataset.channels=2", "dataset.channels=2 must be 3 (RGB) or 1 (grayscale)"),
    ("dataset.mean=[0.5,0.5]", "dataset.mean=[0.5, 0.5] must be a list of 3 number(s)"),
    ("dataset.std=[0.5]", "dataset.std=[0.5] must be a list of 3 number(s)"),
    ("dataset.std=[0.2,0,0.2]", "dataset.std[1]=0.0 is out of range: it must be > 0"),
    ("dataset.mean=[0.5,2,0.5]", "dataset.mean[1]=2.0 is out of range"),
])
def test_image_folder_keys_are_checked_at_config_time(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        validate(compose_config("dataset=image_folder", f"dataset.root={tmp_path}", "trainer.device=cpu", override))
    assert expected in str(err.value)


def test_image_folder_root_is_required():
    with pytest.raises(ConfigError, match="dataset.root.*missing mandatory value"):
        validate(compose_config("dataset=image_folder", "trainer.device=cpu"))


# ------------------------------------------------------------------------------- models and augmentation


def test_models_and_augmentations_build_for_the_specs(tmp_path):
    make_tiny(tmp_path / "tiny")
    run = validate(compose_config("dataset=tiny_imagenet", f"dataset.root={tmp_path / 'tiny'}", "model=resnet18",
                                  "trainer.device=cpu", "augmentation.ops=[random_crop,hflip,normalize]"))
    prep = prepare(run)
    assert prep.pipeline.output_shape == (3, 64, 64) and prep.spec.num_classes == 3
    images = load_dataset(run.dataset, seed=0).train.load().images[:4]
    prep.model.eval()
    assert prep.model(prep.pipeline(images, train=False)).shape == (4, 3)

    root = make_folder(tmp_path / "folder", {"train": {"a": 2, "b": 2}, "test": {"a": 1}}, size=(50, 70))
    for model, ops, shape in (
        ("lenet", "[random_crop,hflip,normalize]", (3, 50, 70)),
        ("resnet18", "[{op: resize, size: 64},normalize]", (3, 64, 64)),
        ("lenet", "[{op: center_crop, size: [32, 48]},{op: random_crop, size: 28, padding: 2},normalize]", (3, 28, 28)),
    ):
        run = validate(compose_config("dataset=image_folder", f"dataset.root={root}", f"model={model}",
                                      "trainer.device=cpu", f"augmentation.ops={ops}"))
        prep = prepare(run)
        assert prep.pipeline.output_shape == shape
        images = load_dataset(run.dataset, seed=0).train.load().images
        pipeline = build_pipeline(run.augmentation, spec_for(run.dataset))
        x = pipeline(images, train=True, generator=torch.Generator().manual_seed(0))
        prep.model.eval()
        assert x.shape[1:] == shape and prep.model(x).shape == (len(images), 2)


# ------------------------------------------------------------------------------- end to end


def test_training_run_on_an_image_folder_tree(tmp_path):
    root = tmp_path / "data"
    make_folder(root, {"train": {"apple": 12, "berry": 12, "cherry": 12},
                       "test": {"apple": 3, "berry": 2, "cherry": 4}}, size=(36, 44))
    write_image(root / "train" / "berry" / "gray.png", COLORS[1], (50, 30), mode="L")
    run_dir = tmp_path / "run"
    result = run_cnnlab("dataset=image_folder", f"dataset.root={root}", "dataset.image_size=32",
                        "dataset.val_split=6", "model=lenet", "trainer.epochs=1", "trainer.device=cpu",
                        "trainer.progress=false", "trainer.batch_size=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert summary["dataset"] == "image_folder" and summary["num_classes"] == 3
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (31, 6, 9)
    confusion = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0)
    assert list(confusion.columns) == ["apple", "berry", "cherry"] and confusion.to_numpy().sum() == 9
    assert list((root / folders.CACHE_DIR).glob("image_folder-train-32x32-c3-*.npy"))
    # The checkpoint records the dataset's shape and class names: predict needs no dataset files,
    # so a trained model still classifies images after its training folder is moved away.
    image = write_image(tmp_path / "new" / "query.png", COLORS[2], (60, 60))
    root.rename(tmp_path / "moved")
    predicted = subprocess.run([sys.executable, "-m", "cnnlab", "predict", f"run={run_dir}", f"images={image}", "k=3"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert all(name in predicted.stdout for name in ("apple", "berry", "cherry"))
