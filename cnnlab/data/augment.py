"""Batched, on-device augmentation: every op draws per-sample parameters as tensors (crop
offsets, flip masks, jitter factors, angles) and runs on the whole batch at once, on the
device the images are on. No PIL, no per-sample Python.

Config: `ops` is a list; each entry is an op name ("hflip") or a dict {"op": name, **params}.
Pixels are scaled to [0, 1] first; ops run in the listed order (normalize wherever it is
listed). Leading ops that move pixels without changing values (crops, flips) run on the
uint8 tensor, which is exact and 4x less memory traffic than on float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data.datasets import DatasetSpec


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()

# Op name -> its parameters and their defaults.
OPS: dict[str, dict[str, Any]] = {
    "random_crop": {"size": None, "padding": 4},  # size None: the input size; zero padding, pixels
    "hflip": {"p": 0.5},
    "vflip": {"p": 0.5},
    "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},  # factor 1 +- x
    "rotation": {"degrees": 15},  # angle uniform in [-degrees, degrees]
    "resize": {"size": REQUIRED},  # int -> square size x size, or [height, width]
    "center_crop": {"size": REQUIRED},
    "normalize": {"stats": "dataset"},  # "dataset": the spec's mean/std; "half": 0.5/0.5
}
NORMALIZE_STATS = ("dataset", "half")


@dataclass
class AugmentationConfig:
    name: str = "none"
    ops: List[Any] = field(default_factory=lambda: ["normalize"])

    def validate(self, prefix: str = "augmentation") -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"{prefix}.name={self.name!r} must be a string")
        _parse_ops(self.ops, prefix)


# ------------------------------------------------------------------------------- parsing


def _parse_ops(ops: Any, prefix: str) -> list[tuple[str, dict[str, Any], str]]:
    """Validate the ops list; return (name, params with defaults filled, key) per entry."""
    if isinstance(ops, (DictConfig, ListConfig)):
        ops = OmegaConf.to_container(ops, resolve=True)
    if ops is None:
        ops = []
    if not isinstance(ops, (list, tuple)):
        raise ConfigError(f"{prefix}.ops must be a list of ops; choose from: {', '.join(OPS)}")
    parsed = []
    for i, entry in enumerate(ops):
        key = f"{prefix}.ops[{i}]"
        if isinstance(entry, (DictConfig, ListConfig)):
            entry = OmegaConf.to_container(entry, resolve=True)
        if isinstance(entry, str):
            name, given = entry, {}
            check_choice(key, name, OPS)
        elif isinstance(entry, dict):
            if "op" not in entry:
                raise ConfigError(f"{key} needs an 'op' key naming the op; choose one of: {', '.join(OPS)}")
            name, given = entry["op"], {k: v for k, v in entry.items() if k != "op"}
            check_choice(f"{key}.op", name, OPS)
        else:
            raise ConfigError(
                f"{key}={entry!r} must be an op name or a dict {{op: name, ...params}}; "
                f"ops: {', '.join(OPS)}"
            )
        for param in given:
            if param not in OPS[name]:
                valid = ", ".join(f"{k} (default {v!r})" for k, v in OPS[name].items())
                raise ConfigError(f"{key}.{param} is not a parameter of {name}; valid parameters: {valid}")
        params = {**OPS[name], **given}
        for param, value in params.items():
            params[param] = _check_param(name, param, value, f"{key}.{param}")
        parsed.append((name, params, key))
    return parsed


def _number(key: str, value: Any, low: float, high: float | None = None, integer: bool = False):
    kind = "a whole number" if integer else "a number"
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad_type or (integer and not float(value).is_integer()) or math.isnan(value):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={value!r} must be {kind} {bounds}")
    check_range(key, value, low, high)
    return int(value) if integer else float(value)


def _size(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{key}={list(value)!r} must be one number or [height, width]")
        return (_number(key, value[0], 1, integer=True), _number(key, value[1], 1, integer=True))
    n = _number(key, value, 1, integer=True)
    return (n, n)


def _check_param(op: str, param: str, value: Any, key: str) -> Any:
    if value is REQUIRED:
        raise ConfigError(f"{key} must be set for {op}: one number (square) or [height, width]")
    if param == "size":
        return None if value is None else _size(key, value)
    if param == "padding":
        return _number(key, value, 0, integer=True)
    if param == "p":
        return _number(key, value, 0, 1)
    if param in ("brightness", "contrast", "saturation"):
        return _number(key, value, 0)
    if param == "degrees":
        return _number(key, value, 0, 180)
    if param == "stats":
        check_choice(key, value, NORMALIZE_STATS)
        return value
    raise AssertionError(f"no check for {op}.{param}")  # every OPS parameter has a branch above


# ------------------------------------------------------------------------------- ops
# Each op: shape(in_shape) -> out_shape; train(x, generator); eval(x). `on_uint8`: exact on uint8.


def _uniform(n: int, low: float, high: float, like: torch.Tensor, g) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=like.device, dtype=torch.float32)


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


class _RandomCrop:
    on_uint8 = True

    def __init__(self, size, padding, in_shape):
        self.h, self.w = size or in_shape[1:]
        self.padding = padding
        self.in_hw = in_shape[1:]

    def train(self, x, g):
        p, h, w = self.padding, self.h, self.w
        if p == 0 and (h, w) == tuple(x.shape[-2:]):
            return x
        if p:
            x = F.pad(x, (p, p, p, p))  # zeros
        b, c, hp, wp = x.shape
        dev = x.device
        top = torch.randint(0, hp - h + 1, (b,), generator=g, device=dev)
        left = torch.randint(0, wp - w + 1, (b,), generator=g, device=dev)
        rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B,1,h,1]
        cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [B,1,1,w]
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        return x[batch, chans, rows, cols]  # one gather: [B, C, h, w]

    def eval(self, x):  # a crop smaller than its input becomes a center crop: same shape as train
        return _center_crop(x, self.h, self.w)


class _Flip:
    on_uint8 = True

    def __init__(self, dim, p):
        self.dim, self.p = dim, p

    def train(self, x, g):
        mask = torch.rand(x.shape[0], generator=g, device=x.device) < self.p
        return torch.where(mask[:, None, None, None], x.flip(self.dim), x)

    def eval(self, x):
        return x


class _ColorJitter:
    on_uint8 = False
    _LUMA = (0.299, 0.587, 0.114)

    def __init__(self, brightness, contrast, saturation, channels):
        self.b, self.c = brightness, contrast
        self.s = saturation if channels == 3 else 0.0  # saturation needs colour

    def _gray(self, x):  # [B,1,H,W]
        if x.shape[1] == 3:
            w = torch.tensor(self._LUMA, device=x.device, dtype=x.dtype)
            return (x * w[None, :, None, None]).sum(1, keepdim=True)
        return x.mean(1, keepdim=True)

    def train(self, x, g):
        n = x.shape[0]
        if self.b:
            f = _uniform(n, max(0.0, 1 - self.b), 1 + self.b, x, g)[:, None, None, None]
            x = (x * f).clamp_(0, 1)
        if self.c:
            f = _uniform(n, max(0.0, 1 - self.c), 1 + self.c, x, g)[:, None, None, None]
            m = self._gray(x).mean((1, 2, 3), keepdim=True)
            x = ((x - m) * f + m).clamp_(0, 1)
        if self.s:
            f = _uniform(n, max(0.0, 1 - self.s), 1 + self.s, x, g)[:, None, None, None]
            gray = self._gray(x)
            x = ((x - gray) * f + gray).clamp_(0, 1)
        return x

    def eval(self, x):
        return x


class _Rotation:
    on_uint8 = False

    def __init__(self, degrees):
        self.degrees = degrees

    def train(self, x, g):
        if not self.degrees:
            return x
        angles = _uniform(x.shape[0], -self.degrees, self.degrees, x, g)
        return rotate(x, angles)

    def eval(self, x):
        return x


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of x [B,C,H,W] (float) by its own angle (degrees, counter-clockwise
    as displayed), about the centre, zero fill; correct for non-square images."""
    b, _, h, w = x.shape
    rad = degrees.to(x.dtype) * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input in normalized coords; scale the off-diagonal terms
    # by the aspect ratio so that a rotation stays a rotation in pixel space.
    theta = torch.stack([
        torch.stack([cos, -sin * (h / w), zero], 1),
        torch.stack([sin * (w / h), cos, zero], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Resize:
    on_uint8 = False

    def __init__(self, size):
        self.size = size

    def train(self, x, g):
        return self.eval(x)

    def eval(self, x):
        if tuple(x.shape[-2:]) == self.size:
            return x
        down = self.size[0] < x.shape[-2] or self.size[1] < x.shape[-1]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=down)


class _CenterCrop:
    on_uint8 = True

    def __init__(self, size):
        self.h, self.w = size

    def train(self, x, g):
        return self.eval(x)

    def eval(self, x):
        return _center_crop(x, self.h, self.w)


class _Normalize:
    on_uint8 = False

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: dict = {}

    def _stats(self, x):
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(
                torch.tensor(v, device=x.device, dtype=x.dtype)[None, :, None, None]
                for v in (self.mean, self.std)
            )
        return self._cache[key]

    def train(self, x, g):
        return self.eval(x)

    def eval(self, x):
        mean, std = self._stats(x)
        return (x - mean) / std


# ------------------------------------------------------------------------------- pipeline


class Pipeline:
    """Callable: uint8 [B,C,H,W] on any device -> float32 [B, *output_shape] on that device."""

    def __init__(self, stages: list, names: list[str], input_shape, output_shape):
        self.stages = stages
        self.names = names
        self.input_shape: tuple[int, int, int] = tuple(input_shape)
        self.output_shape: tuple[int, int, int] = tuple(output_shape)
        self._n_uint8 = next((i for i, s in enumerate(stages) if not s.on_uint8), len(stages))

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(self.names) or 'identity'}: {self.input_shape} -> {self.output_shape})"

    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"augmentation pipeline was built for images [B, {', '.join(map(str, self.input_shape))}], "
                f"got {list(images.shape)}"
            )
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(
                f"the generator is on {generator.device}, the images on {images.device}: "
                f"create it with torch.Generator(device=images.device)"
            )
        x = images
        k = self._n_uint8 if images.dtype == torch.uint8 else 0
        for stage in self.stages[:k]:  # exact on uint8: cheaper before the float conversion
            x = stage.train(x, generator) if train else stage.eval(x)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255)
        else:
            x = x.to(torch.float32)
        for stage in self.stages[k:]:
            x = stage.train(x, generator) if train else stage.eval(x)
        return x.contiguous()


def build_pipeline(cfg: AugmentationConfig, spec: DatasetSpec, prefix: str = "augmentation") -> Pipeline:
    """Validate the op list against the dataset's image shape and build the pipeline.
    Impossible combinations (a crop larger than the image at its point in the list,
    color_jitter after normalize) raise ConfigError here, at config time."""
    parsed = _parse_ops(cfg.ops, prefix)
    shape = (spec.channels, spec.height, spec.width)
    stages, names = [], []
    normalized_at = None
    for name, p, key in parsed:
        c, h, w = shape
        if name in ("random_crop", "center_crop") and p["size"] is not None:
            ch, cw = p["size"]
            if ch > h or cw > w:
                where = "the input" if not names else f"after {' -> '.join(names)}"
                raise ConfigError(
                    f"{key}.size={ch}x{cw} ({name}) is larger than the {h}x{w} image at that point "
                    f"({where}; {spec.name} images are {spec.height}x{spec.width}); "
                    f"choose a size <= {h}x{w} or resize first"
                )
        if name == "color_jitter" and normalized_at is not None:
            raise ConfigError(
                f"{key}: color_jitter works on pixels in [0, 1] and must come before "
                f"normalize ({normalized_at}); move it earlier in the list"
            )
        if name == "random_crop":
            stage = _RandomCrop(p["size"], p["padding"], shape)
            shape = (c, stage.h, stage.w)
        elif name == "hflip":
            stage = _Flip(-1, p["p"])
        elif name == "vflip":
            stage = _Flip(-2, p["p"])
        elif name == "color_jitter":
            stage = _ColorJitter(p["brightness"], p["contrast"], p["saturation"], c)
        elif name == "rotation":
            stage = _Rotation(p["degrees"])
        elif name == "resize":
            stage = _Resize(p["size"])
            shape = (c, *p["size"])
        elif name == "center_crop":
            stage = _CenterCrop(p["size"])
            shape = (c, *p["size"])
        else:  # normalize
            if p["stats"] == "half":
                mean, std = (0.5,) * c, (0.5,) * c
            else:
                mean, std = spec.mean, spec.std
            stage = _Normalize(mean, std)
            normalized_at = key
        stages.append(stage)
        names.append(name)
    return Pipeline(stages, names, (spec.channels, spec.height, spec.width), shape)
