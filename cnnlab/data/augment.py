"""Batched, on-device augmentation: every op draws per-sample parameters as tensors (crop
offsets, flip masks, jitter factors, angles) and runs on the whole batch at once, on the
device the images are on. No PIL, no per-sample Python.

Config: `ops` is a list; each entry is an op name ("hflip") or a dict {"op": name, **params}.
Pixels are scaled to [0, 1] first; ops run in the listed order (normalize wherever it is
listed). Leading ops that move pixels without changing values (crops, flips) run on the
uint8 tensor, which is exact and 4x less memory traffic than on float.

Ops are a registry: one decorated class adds one, here or in your own module:

    @register_op("cutout", size=8, p=0.5, fill=Param(0.0, number(0, 1)))
    class Cutout(Op):
        def train(self, x, generator): ...   # self.size == (8, 8), self.p, self.fill: checked values

Each keyword declares a parameter as Param(default, check); the names in SHARED_PARAMS (p, size,
padding, degrees) mean the same in every op and take a bare default. An Op has `on_uint8`,
`output_shape`, `train(x, generator)` and `eval(x)` (defaults: shape kept, train = eval, eval =
identity); its constructor gets a BuildContext (its place in the list: the shape reaching it, the
dataset spec, the ops before it), so position-dependent errors come at build time. OPS is a live,
read-only view of the registry. Bad config values are ConfigErrors; a malformed declaration is a
TypeError and a taken name a ValueError (as cnnlab.models.register).
"""
from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, List, TypeVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.data.registry import DatasetSpec

Shape = tuple[int, int, int]  # (C, H, W)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()  # a parameter's default when the user must give it


@dataclass
class AugmentationConfig:
    name: str = "none"
    ops: List[Any] = field(default_factory=lambda: ["normalize"])

    def validate(self, prefix: str = "augmentation") -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"{prefix}.name={self.name!r} must be a string")
        _parse_ops(self.ops, prefix)


# ------------------------------------------------------------------------------- parameter checks


@dataclass(frozen=True)
class Check:
    """A parameter check: check(key, value) returns the value the op gets, or raises a
    ConfigError naming key. `wants` says what a valid value is, for "must be set" messages."""

    run: Callable[[str, Any], Any]
    wants: str

    def __call__(self, key: str, value: Any) -> Any:
        return self.run(key, value)


def _bounds(low: float, high: float | None) -> str:
    return f">= {low}" if high is None else f"in [{low}, {high}]"


def _number(key: str, value: Any, low: float, high: float | None = None, integer: bool = False):
    kind = "a whole number" if integer else "a number"
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad_type or (integer and not float(value).is_integer()) or math.isnan(value):
        raise ConfigError(f"{key}={value!r} must be {kind} {_bounds(low, high)}")
    check_range(key, value, low, high)
    return int(value) if integer else float(value)


def number(low: float, high: float | None = None) -> Check:
    """An int or float (not bool, not NaN) in [low, high] (no upper bound if high is None); as float."""
    return Check(lambda key, value: _number(key, value, low, high), f"a number {_bounds(low, high)}")


def whole(low: int, high: int | None = None) -> Check:
    """A whole number (5 or 5.0) in [low, high] (no upper bound if high is None); as int."""
    return Check(lambda key, value: _number(key, value, low, high, integer=True),
                 f"a whole number {_bounds(low, high)}")


def choice(*options: Any) -> Check:
    """One of `options`, as given."""
    def run(key: str, value: Any) -> Any:
        check_choice(key, value, options)
        return value

    return Check(run, f"one of: {', '.join(map(str, options))}")


def _size(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{key}={list(value)!r} must be one number or [height, width]")
        return (_number(key, value[0], 1, integer=True), _number(key, value[1], 1, integer=True))
    n = _number(key, value, 1, integer=True)
    return (n, n)


size_hw = Check(_size, "one number (square) or [height, width]")  # -> (height, width), pixels >= 1

# Parameter names that mean the same in every op: a bare default under one of them gets this check.
SHARED_PARAMS: Mapping[str, Check] = MappingProxyType({
    "p": number(0, 1),  # a probability
    "size": size_hw,  # an output size
    "padding": whole(0),  # pixels
    "degrees": number(0, 180),  # an angle bound
})
NORMALIZE_STATS = ("dataset", "half")


@dataclass(frozen=True)
class Param:
    """One op parameter. default: REQUIRED (the user must give it), None (None is then a valid
    value: "not set"), or a value that passes `check`. check(key, value) -> the value to use."""

    default: Any
    check: Callable[[str, Any], Any]


# ------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class BuildContext:
    """An op's place in the pipeline being built, handed to its constructor: what its sizes and
    its position-dependent checks need."""

    name: str  # the op's registered name
    key: str  # its config key, e.g. "augmentation.ops[2]": errors name it
    shape: Shape  # (C, H, W) of the images that reach it
    spec: DatasetSpec  # the dataset: original size, channels, mean/std
    earlier: tuple[tuple[str, str], ...] = ()  # (name, key) of the ops before it, in order

    @property
    def where(self) -> str:
        """'the input', or 'after resize -> hflip': where in the list this op's input comes from."""
        return "the input" if not self.earlier else f"after {' -> '.join(n for n, _ in self.earlier)}"

    def last(self, name: str) -> str | None:
        """The key of the last op `name` before this one, None if there is none."""
        return next((k for n, k in reversed(self.earlier) if n == name), None)

    def require_fits(self, size: tuple[int, int], param: str = "size") -> None:
        """ConfigError unless a (height, width) crop fits in the image at this point."""
        _, h, w = self.shape
        ch, cw = size
        if ch > h or cw > w:
            spec = self.spec
            raise ConfigError(
                f"{self.key}.{param}={ch}x{cw} ({self.name}) is larger than the {h}x{w} image at that point "
                f"({self.where}; {spec.name} images are {spec.height}x{spec.width}); "
                f"choose a size <= {h}x{w} or resize first"
            )


class Op:
    """An augmentation op; subclass it and register the subclass with @register_op.
    Called on batches [B, C, H, W]: uint8 where the input is uint8 and this op and every op
    before it are `on_uint8`, else float32 (pixels in [0, 1] until a normalize)."""

    on_uint8: bool = False  # exact on uint8 (moves pixels, no arithmetic): may run before the float step

    def __init__(self, ctx: BuildContext, /, **params: Any) -> None:
        for name, value in params.items():  # the checked parameters, as attributes
            setattr(self, name, value)

    def output_shape(self, shape: Shape) -> Shape:
        """(C, H, W) out for (C, H, W) in; the same in train and eval."""
        return shape

    def train(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random ops draw from `generator` only; deterministic ones do what eval does."""
        return self.eval(x)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic; random ops are off in evaluation."""
        return x


@dataclass(frozen=True)
class _Entry:
    cls: type[Op]
    params: Mapping[str, Param]


_REGISTRY: dict[str, _Entry] = {}
# "op" names the op in a config entry; Op's own attributes would be shadowed by Op.__init__.
_RESERVED = ("op", "on_uint8", "output_shape", "train", "eval")
_C = TypeVar("_C", bound=type)


def register_op(name: str, **params: Any) -> Callable[[_C], _C]:
    """Class decorator: register an Op subclass as augmentation op `name`. Each keyword declares
    a parameter: Param(default, check), or a bare default for a name in SHARED_PARAMS.
    TypeError for a malformed declaration, ValueError for a taken name or a bad default."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_op: the op name must be a non-empty string, got {name!r}")
    declared = {param: _declare(name, param, given) for param, given in params.items()}

    def decorator(cls: _C) -> _C:
        _check_class(name, cls, declared)
        if name in _REGISTRY:
            raise ValueError(f"augmentation op {name!r} is already registered "
                             f"(by {_REGISTRY[name].cls.__qualname__}); choose another name")
        _REGISTRY[name] = _Entry(cls, MappingProxyType(declared))
        return cls

    return decorator


def _declare(op: str, param: str, given: Any) -> Param:
    if not param.isidentifier() or param in _RESERVED:
        raise TypeError(f"register_op({op!r}): {param!r} cannot be a parameter name "
                        f"(a Python identifier other than {', '.join(_RESERVED)})")
    if not isinstance(given, Param):
        if param not in SHARED_PARAMS:
            raise TypeError(
                f"register_op({op!r}): parameter {param!r} needs a check: declare it as "
                f"{param}=Param({given!r}, check), e.g. check=number(0, 1); bare defaults are "
                f"only for the shared names {', '.join(SHARED_PARAMS)}"
            )
        given = Param(given, SHARED_PARAMS[param])
    if not callable(given.check):
        raise TypeError(f"register_op({op!r}): the check of {param!r} must be callable(key, value), "
                        f"got {given.check!r}")
    if given.default is not REQUIRED and given.default is not None:
        try:
            given.check(f"{op}.{param}", given.default)
        except ConfigError as err:
            raise ValueError(f"register_op({op!r}): the default fails its own check: {err}") from None
    return given


def _check_class(name: str, cls: Any, declared: Mapping[str, Param]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Op)):
        raise TypeError(f"register_op({name!r}) decorates a subclass of cnnlab.data.augment.Op, got {cls!r}")
    if not isinstance(cls.on_uint8, bool):
        raise TypeError(f"{cls.__qualname__}.on_uint8 must be True or False, got {cls.on_uint8!r}")
    if cls.train is Op.train and cls.eval is Op.eval:
        raise TypeError(f"{cls.__qualname__} (op {name!r}) defines neither train nor eval: it would do nothing")
    try:  # the build step calls cls(ctx, **params): fail now, not at the first run that uses it
        inspect.signature(cls).bind(None, **dict.fromkeys(declared))
    except TypeError as err:
        raise TypeError(f"{cls.__qualname__} (op {name!r}) must be constructible as "
                        f"{cls.__qualname__}(ctx, {', '.join(declared)}): {err}") from None


def unregister_op(name: str) -> None:
    """Remove op `name` (for tests, and notebooks that re-run a registering cell)."""
    if name not in _REGISTRY:
        raise ValueError(f"augmentation op {name!r} is not registered; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def available_ops() -> list[str]:
    """Registered op names in registration order, built-ins first: the order messages list them in."""
    return list(_REGISTRY)


class _Defaults(Mapping):
    """Read-only, live view of the registry: op name -> {param: default}."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return {param: p.default for param, p in _REGISTRY[name].params.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"OPS({dict(self)!r})"


OPS: Mapping[str, dict[str, Any]] = _Defaults()


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
        declared = _REGISTRY[name].params
        for param in given:
            if param not in declared:
                valid = ", ".join(f"{k} (default {p.default!r})" for k, p in declared.items())
                raise ConfigError(f"{key}.{param} is not a parameter of {name}; valid parameters: {valid}")
        params = {
            param: _check_param(name, p, given.get(param, p.default), f"{key}.{param}")
            for param, p in declared.items()
        }
        parsed.append((name, params, key))
    return parsed


def _check_param(op: str, param: Param, value: Any, key: str) -> Any:
    if value is REQUIRED or (value is None and param.default is REQUIRED):  # null: not given
        wants = getattr(param.check, "wants", "")
        raise ConfigError(f"{key} must be set for {op}" + (f": {wants}" if wants else ""))
    if value is None and param.default is None:  # None is valid exactly where it is the default
        return None
    return param.check(key, value)


# ------------------------------------------------------------------------------- built-in ops
# Registered in this order, which is the order OPS and the error messages list them in.


def _uniform(n: int, low: float, high: float, like: torch.Tensor, g) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=like.device, dtype=torch.float32)


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


@register_op("random_crop", size=None, padding=4)  # size None: the input size; zero padding, pixels
class _RandomCrop(Op):
    on_uint8 = True

    def __init__(self, ctx: BuildContext, size: tuple[int, int] | None, padding: int) -> None:
        if size is not None:
            ctx.require_fits(size)
        self.h, self.w = size or ctx.shape[1:]
        self.padding = padding

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[0], self.h, self.w)

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


class _Flip(Op):
    on_uint8 = True
    dim: int  # the flipped axis; self.p from Op's constructor

    def train(self, x, g):
        mask = torch.rand(x.shape[0], generator=g, device=x.device) < self.p
        return torch.where(mask[:, None, None, None], x.flip(self.dim), x)


@register_op("hflip", p=0.5)
class _HFlip(_Flip):
    dim = -1


@register_op("vflip", p=0.5)
class _VFlip(_Flip):
    dim = -2


@register_op(  # factor uniform in [1 - x, 1 + x], at least 0
    "color_jitter", brightness=Param(0.4, number(0)), contrast=Param(0.4, number(0)),
    saturation=Param(0.4, number(0)),
)
class _ColorJitter(Op):
    on_uint8 = False
    _LUMA = (0.299, 0.587, 0.114)

    def __init__(self, ctx: BuildContext, brightness: float, contrast: float, saturation: float) -> None:
        normalized_at = ctx.last("normalize")
        if normalized_at is not None:
            raise ConfigError(
                f"{ctx.key}: color_jitter works on pixels in [0, 1] and must come before "
                f"normalize ({normalized_at}); move it earlier in the list"
            )
        self.b, self.c = brightness, contrast
        self.s = saturation if ctx.shape[0] == 3 else 0.0  # saturation needs colour

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


@register_op("rotation", degrees=15)  # angle uniform in [-degrees, degrees]
class _Rotation(Op):
    on_uint8 = False

    def train(self, x, g):
        if not self.degrees:
            return x
        angles = _uniform(x.shape[0], -self.degrees, self.degrees, x, g)
        return rotate(x, angles)


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


@register_op("resize", size=REQUIRED)  # one number: square size x size, or [height, width]
class _Resize(Op):
    on_uint8 = False  # interpolation: new pixel values

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[0], *self.size)

    def eval(self, x):
        if tuple(x.shape[-2:]) == self.size:
            return x
        down = self.size[0] < x.shape[-2] or self.size[1] < x.shape[-1]
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=down)


@register_op("center_crop", size=REQUIRED)
class _CenterCrop(Op):
    on_uint8 = True

    def __init__(self, ctx: BuildContext, size: tuple[int, int]) -> None:
        ctx.require_fits(size)
        self.h, self.w = size

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[0], self.h, self.w)

    def eval(self, x):
        return _center_crop(x, self.h, self.w)


# stats "dataset": the spec's mean/std; "half": 0.5/0.5
@register_op("normalize", stats=Param("dataset", choice(*NORMALIZE_STATS)))
class _Normalize(Op):
    on_uint8 = False

    def __init__(self, ctx: BuildContext, stats: str) -> None:
        c = ctx.shape[0]
        mean, std = ((0.5,) * c, (0.5,) * c) if stats == "half" else (ctx.spec.mean, ctx.spec.std)
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

    def eval(self, x):
        mean, std = self._stats(x)
        return (x - mean) / std


# ------------------------------------------------------------------------------- pipeline


class Pipeline:
    """Callable: uint8 [B,C,H,W] on any device -> float32 [B, *output_shape] on that device."""

    def __init__(self, stages: list[Op], names: list[str], input_shape, output_shape):
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
    shape: Shape = (spec.channels, spec.height, spec.width)
    stages: list[Op] = []
    earlier: list[tuple[str, str]] = []
    for name, params, key in parsed:
        ctx = BuildContext(name, key, shape, spec, tuple(earlier))
        stage = _REGISTRY[name].cls(ctx, **params)  # ConfigError where the op cannot go at this point
        shape = _output_shape(stage, ctx)
        stages.append(stage)
        earlier.append((name, key))
    return Pipeline(stages, [name for name, _ in earlier], (spec.channels, spec.height, spec.width), shape)


def _output_shape(stage: Op, ctx: BuildContext) -> Shape:
    # A user op's wrong shape would otherwise surface later, as a model that does not fit.
    out = stage.output_shape(ctx.shape)
    try:
        shape = tuple(operator.index(n) for n in out)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise TypeError(f"{type(stage).__qualname__}.output_shape({ctx.shape}) (op {ctx.name!r}) "
                        f"must return (C, H, W), three whole numbers >= 1; got {out!r}")
    return shape
