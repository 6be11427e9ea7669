"""The user's own networks: `model=custom model._target_=mynet.TinyVGG`, and `@cnnlab.register_model`.

A class (or a function returning an nn.Module) is called with the keys the user set and, where it
has parameters of these names, the dataset's `in_channels`, `num_classes` and `image_size` (an int
for square images, else (height, width)). The common keys activation, dropout and batch_norm are
passed when set; a key the constructor does not take is an error, never silently dropped (a sweep
over it would train one model many times). The built model is run once on one image (eval mode,
no grad), so a network whose layers do not fit the dataset's image size fails here, at build time,
with the shapes in the message.
"""
# No `from __future__ import annotations`: OmegaConf reads the schemas' field types at runtime.
import copy
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from cnnlab import usercode
from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.models import ModelConfig, available, register
from cnnlab.models.layers import INIT_SCHEMES

DIMENSIONS = ("in_channels", "num_classes", "image_size")  # given from the dataset, never config keys
COMMON = ("activation", "dropout", "batch_norm")
COMMON_TYPES = {"activation": str, "dropout": float, "batch_norm": bool}


@dataclass
class UserModelConfig(ModelConfig):
    """A user's model: the common keys are passed only when set (null: the model's own default), and
    its own weight init is kept unless model.init=kaiming is asked for."""

    activation: Optional[str] = None
    dropout: Optional[float] = None
    batch_norm: Optional[bool] = None
    init: str = "pytorch_default"

    def validate(self, prefix: str = "model") -> None:
        check_choice(f"{prefix}.name", self.name, available())
        if self.activation is not None and not isinstance(self.activation, str):
            raise ConfigError(f"{prefix}.activation={self.activation!r} must be a name, e.g. relu")
        if self.dropout is not None:
            check_range(f"{prefix}.dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_choice(f"{prefix}.batch_norm", self.batch_norm, (True, False, None))
        check_choice(f"{prefix}.init", self.init, INIT_SCHEMES)

    def arguments(self) -> dict[str, Any]:
        """What the constructor is given: every key but name and init, the common ones when set."""
        skip = {"name", "init", "_target_", "kwargs"}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {k: v for k, v in values.items() if not (k in COMMON and v is None)}


@dataclass
class CustomModelConfig(UserModelConfig):
    """model=custom: any nn.Module class, or function returning one, by its dotted path."""

    EXTRA_KEYS: ClassVar[str] = "kwargs"  # keys added with +model.<key> land here (config.typed_group)
    name: str = "custom"
    _target_: Optional[str] = None  # module.Name, e.g. mynet.TinyVGG (mynet.py in the working directory)
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments, from +model.<key>=...

    def validate(self, prefix: str = "model") -> None:
        super().validate(prefix)
        if self._target_ is None:
            raise ConfigError(f"model=custom needs {prefix}._target_=<module.Class>, e.g. {prefix}._target_=mynet.TinyVGG "
                              f"for class TinyVGG in mynet.py in the directory you run cnnlab from")
        usercode.check_dotted(f"{prefix}._target_", self._target_, "mynet.TinyVGG")

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), **self.kwargs}

    def label(self) -> str:
        return self._target_ or self.name


def construct(factory: Any, path: str, cfg: UserModelConfig, in_channels: int, num_classes: int,
              input_size: tuple[int, int]) -> nn.Module:
    """The user's model for this dataset, checked to be an nn.Module that maps images to num_classes logits."""
    given = cfg.arguments()
    if isinstance(factory, nn.Module):  # an instance handed over from Python: its own weights, copied
        extra = getattr(cfg, "kwargs", None)
        if extra:
            raise ConfigError(f"model: {path} was given as a built instance; give its class to pass "
                              f"+model.<key> arguments ({', '.join(extra)})")
        model = copy.deepcopy(factory)
    else:
        height, width = input_size
        offered = {"in_channels": in_channels, "num_classes": num_classes,
                   "image_size": height if height == width else (height, width)}
        model = usercode.call(factory, path, "model", given, offered)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {path}(...) returned {type(model).__name__}, not a torch.nn.Module")
    if torch.empty(()).device.type != "meta":  # the memory estimate builds on the meta device: no probe there
        _probe(model, path, in_channels, num_classes, input_size)
    return model


def _probe(model: nn.Module, path: str, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> None:
    shape = (1, in_channels, *input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=next(model.parameters(), torch.empty(0)).device))
    except Exception as err:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"model: {path} fails on a {'x'.join(map(str, shape[1:]))} image (what this dataset gives): "
                          f"{usercode.error_text(err)}; check that its layers are sized from in_channels, image_size and "
                          f"num_classes, which cnnlab passes when the constructor takes them") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model: {path} returns {got} for one image; it must return logits of shape (batch, "
                          f"{num_classes}) for this dataset's {num_classes} classes (take num_classes in the constructor)")


def _build_custom(cfg: CustomModelConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
    factory = usercode.locate(cfg._target_, "model._target_")
    return construct(factory, cfg._target_, cfg, in_channels, num_classes, input_size)


register("custom", CustomModelConfig)(_build_custom)


# ------------------------------------------------------------------------------- @register_model


def register_model(name: str, schema: Optional[type] = None, *, replace: bool = False) -> Any:
    """Decorator: `@cnnlab.register_model("tinyvgg")` on an nn.Module class (or a function returning one)
    makes `model=tinyvgg` select it, with `model.<key>` for each constructor argument (typed from its
    annotations and defaults, so a typo or a wrong type is refused by name). `schema`: your own
    UserModelConfig subclass instead. A name already taken is an error unless `replace=True`; the same
    class registered again (a notebook cell run twice) replaces itself."""

    if schema is not None and not (inspect.isclass(schema) and issubclass(schema, UserModelConfig)):
        raise TypeError(f"register_model({name!r}, schema=...) needs a dataclass subclass of "
                        f"cnnlab.models.custom.UserModelConfig, got {schema!r}")

    def decorator(factory: Any) -> Any:
        config = schema or schema_from_signature(name, factory)
        path = usercode.dotted_name(factory)

        def build(cfg: UserModelConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
            return construct(factory, path, cfg, in_channels, num_classes, input_size)

        register(name, config, replace=replace, origin=path)(build)
        return factory

    return decorator


def schema_from_signature(name: str, factory: Any) -> type:
    """A UserModelConfig subclass with one field per constructor argument (required ones: ???)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations: untyped fields
        hints = {}
    fields = []
    for param in inspect.signature(factory).parameters.values():
        if param.name in DIMENSIONS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "???" if param.default is param.empty else param.default
        kind = hints.get(param.name, Any)
        if param.name in COMMON:
            kind = Optional[COMMON_TYPES[param.name]]
        elif kind in (int, float, bool, str):  # OmegaConf checks these; anything else is taken as given
            kind = Optional[kind] if default is None else kind
        else:
            kind = Any
        if isinstance(default, (list, dict, tuple)):
            fields.append((param.name, Any, field(default_factory=lambda d=default: copy.deepcopy(d))))
        else:
            fields.append((param.name, kind, field(default=default)))
    fields.append(("name", str, field(default=name)))
    return dataclasses.make_dataclass(f"{name}_config", fields, bases=(UserModelConfig,))
