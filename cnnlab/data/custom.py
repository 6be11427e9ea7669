"""dataset=custom: the user's own data, from a function named by `dataset._target_`.

    cnnlab dataset=custom dataset._target_=mydata.load +dataset.path=scans/

calls `mydata.load(path="scans/")` (keys added with +dataset.<key> are its arguments). It returns

    {"train": TRAIN, "test": TEST, "val": VAL (optional), "classes": [names] (optional)}
    or (TRAIN, TEST) or (TRAIN, TEST, classes)

where each split is `(images, labels)`, or a torchvision-style dataset whose items are (image, label).
Images: uint8, as a tensor or numpy array N x C x H x W, N x H x W (one channel) or N x H x W x C
(numpy's layout, C in 1 or 3); items of a dataset may be PIL images, HxW(xC) arrays or CxHxW tensors,
and float tensors in [0, 1] (torchvision's ToTensor) are scaled back to 0-255. Labels: integers
0..classes-1. The splits become uint8 tensors once, then train like any built-in dataset (resident or
streaming, subset, val_split); the spec (shape, classes, mean/std measured on the training images)
is recorded in the checkpoint, so evaluate and predict on the run need no code of the user's.
"""
# No `from __future__ import annotations`: OmegaConf reads the schema's field types at runtime.
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from cnnlab import usercode
from cnnlab.checks import ConfigError
from cnnlab.data.registry import DatasetConfig, DatasetSpec, Loaded, register_dataset
from cnnlab.data.splits import Split

KEY = "dataset"
_LAST: dict[str, Any] = {}  # the last data loaded: the spec and the loader ask for it once per process


@dataclass
class CustomDatasetConfig(DatasetConfig):
    EXTRA_KEYS: ClassVar[str] = "kwargs"  # keys added with +dataset.<key> land here (config.typed_group)
    name: str = "custom"
    _target_: Optional[str] = None  # module.function returning the splits, e.g. mydata.load
    kwargs: dict[str, Any] = field(default_factory=dict)  # its arguments, from +dataset.<key>=...

    def validate(self, prefix: str = "dataset") -> None:
        if self._target_ is None:
            raise ConfigError(f"dataset=custom needs {prefix}._target_=<module.function>, e.g. "
                              f"{prefix}._target_=mydata.load for def load() in mydata.py; it returns the splits "
                              f"as {{'train': (images, labels), 'test': (images, labels)}}")
        usercode.check_dotted(f"{prefix}._target_", self._target_, "mydata.load")
        super().validate(prefix)


def _data(cfg: CustomDatasetConfig) -> tuple[DatasetSpec, Loaded]:
    fn = usercode.locate(cfg._target_, f"{KEY}._target_")
    key = (id(fn), repr(sorted(cfg.kwargs.items())))
    if _LAST.get("key") != key:
        _LAST.clear()
        result = usercode.call(fn, cfg._target_, KEY, dict(cfg.kwargs), {})
        loaded = convert(result, cfg._target_)
        _LAST.update(key=key, value=(spec_of(loaded), loaded))
    return _LAST["value"]


def convert(result: Any, where: str) -> Loaded:
    """What the user's function returned, as uint8 Splits with checked labels and class names."""
    if isinstance(result, dict):
        unknown = sorted(set(result) - {"train", "test", "val", "classes"})
        if unknown or "train" not in result or "test" not in result:
            raise ConfigError(f"{KEY}: {where}() returned a dict with keys {sorted(result)}; it needs 'train' and "
                              f"'test', and may have 'val' and 'classes'")
        parts = result
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        parts = dict(zip(("train", "test", "classes"), result))
    else:
        raise ConfigError(f"{KEY}: {where}() returned {type(result).__name__}; return {{'train': (images, labels), "
                          f"'test': (images, labels)}} or (train, test), each split (images, labels) or a dataset")
    splits = {name: _split(parts[name], f"{where}() {name}") for name in ("train", "test", "val")
              if parts.get(name) is not None}
    shapes = {name: s.shape for name, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"{KEY}: {where}() splits differ in image shape ({shapes}); every split needs one shape")
    classes = parts.get("classes") or _names(parts)
    count = len(classes) if classes else 1 + max(int(s.labels.max()) for s in splits.values() if len(s))
    classes = tuple(str(c) for c in classes) if classes else tuple(str(i) for i in range(count))
    for name, s in splits.items():
        _check_labels(s.labels, count, f"{where}() {name}")
    return Loaded(splits["train"], splits["test"], splits.get("val"), classes)


def _names(parts: dict[str, Any]) -> Optional[list]:
    classes = getattr(parts["train"], "classes", None)  # torchvision datasets carry their class names
    return list(classes) if isinstance(classes, (list, tuple)) and classes else None


def _split(part: Any, where: str) -> Split:
    arrays = isinstance(part, (tuple, list)) and part and isinstance(part[0], (torch.Tensor, np.ndarray, list))
    if arrays and len(part) != 2:
        raise ConfigError(f"{where} is a {type(part).__name__} of {len(part)} arrays; give (images, labels)")
    if arrays:
        images, labels = (_tensor(p, where) for p in part)
        images = _layout(_uint8(images, where, scale_floats=False), where)
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        images, labels = _from_dataset(part, where)
    else:
        raise ConfigError(f"{where} is a {type(part).__name__}; give (images, labels) or a dataset of (image, label)")
    if labels.dim() != 1 or len(labels) != len(images):
        raise ConfigError(f"{where}: {len(images)} images but labels of shape {tuple(labels.shape)}; give one "
                          f"integer label per image")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ConfigError(f"{where}: labels are {str(labels.dtype).removeprefix('torch.')}; give integer class "
                          f"indices 0..classes-1")
    if len(images) == 0:
        raise ConfigError(f"{where} is empty; every split needs images")
    return Split(images.contiguous(), labels.to(torch.int64).contiguous())


def _tensor(value: Any, where: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))  # a copy we own
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{where}: cannot be read as an array ({err})") from None


def _uint8(images: torch.Tensor, where: str, scale_floats: bool) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    if scale_floats and images.dtype.is_floating_point and images.numel() and 0 <= images.min() and images.max() <= 1:
        return (images * 255).round_().to(torch.uint8)  # torchvision's ToTensor: back to 0..255
    low = float(images.min()) if images.numel() else 0.0
    hint = (" they look normalized (values below 0): leave normalization to cnnlab, which uses the mean and std "
            "it measures" if low < 0 else " e.g. (x * 255).round().to(torch.uint8) for floats in [0, 1]")
    kind = str(images.dtype).removeprefix("torch.")
    raise ConfigError(f"{where}: images are {kind}; give uint8 pixels 0..255;{hint}")


def _layout(images: torch.Tensor, where: str) -> torch.Tensor:
    """N x C x H x W from N x H x W, N x C x H x W or N x H x W x C."""
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 4 and images.shape[1] in (1, 3):
        return images
    if images.dim() == 4 and images.shape[3] in (1, 3):
        return images.permute(0, 3, 1, 2)
    raise ConfigError(f"{where}: images of shape {tuple(images.shape)}; give N x C x H x W, N x H x W or "
                      f"N x H x W x C with 1 or 3 channels")


def _from_dataset(dataset: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is not None and targets is not None and getattr(dataset, "transform", None) is None:
        try:  # torchvision's MNIST, CIFAR: the arrays themselves, without decoding item by item
            return _layout(_uint8(_tensor(data, where), where, False), where), _tensor(targets, where)
        except ConfigError:
            pass
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ConfigError(f"{where}: item {i} is a {type(item).__name__}; a dataset must give (image, label) pairs")
        image = _tensor(np.asarray(item[0]) if not isinstance(item[0], torch.Tensor) else item[0], where)
        if not isinstance(item[0], torch.Tensor) and image.dim() == 3:
            image = image.permute(2, 0, 1)  # PIL and numpy images are H x W x C
        image = _uint8(image if image.dim() == 3 else image.unsqueeze(0), f"{where} item {i}", scale_floats=True)
        if images and image.shape != images[0].shape:
            raise ConfigError(f"{where}: images differ in size (item 0 is {tuple(images[0].shape)}, item {i} is "
                              f"{tuple(image.shape)}); resize them to one size in your function")
        images.append(image)
        labels.append(int(item[1]))
    return torch.stack(images), torch.tensor(labels)


def _check_labels(labels: torch.Tensor, count: int, where: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= count):
        raise ConfigError(f"{where}: labels range {int(labels.min())}..{int(labels.max())}, outside 0..{count - 1} "
                          f"for {count} classes; labels must be class indices 0..classes-1")


def spec_of(loaded: Loaded) -> DatasetSpec:
    """Shape, class names, and the per-channel mean/std of the training images (scaled to [0, 1])."""
    images = loaded.train.images
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):  # float64 sums in chunks: exact enough, bounded memory
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt().clamp_min(1e-3)  # a constant channel: no division by 0
    return DatasetSpec("custom", loaded.classes, channels, images.shape[2], images.shape[3],
                       tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std))


register_dataset("custom", schema=CustomDatasetConfig, spec=lambda cfg: _data(cfg)[0], load=lambda cfg, spec: _data(cfg)[1])
