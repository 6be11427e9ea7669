"""Model registry: every family registers a builder and a config schema under each of its names.

    cfg = typed_group("model", user_node)  # cnnlab.config: merge into schema_for(name), validate
    model = build_model(cfg, in_channels=3, num_classes=10, input_size=(32, 32))

Builders get the dataset's shape, so every layer size is known at construction (no Lazy modules):
parameter counts and weight init are right before the first forward pass.
"""
# No `from __future__ import annotations` here: OmegaConf reads the schema's field types at runtime.
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass

from torch import nn

from cnnlab import usercode
from cnnlab.checks import ConfigError, check_choice, check_range
from cnnlab.models.layers import ACTIVATIONS, INIT_SCHEMES, check_input_size, init_weights

Builder = Callable[..., nn.Module]  # fn(cfg, in_channels, num_classes, input_size) -> nn.Module

_REGISTRY: dict[str, tuple[Builder, type["ModelConfig"]]] = {}
_ORIGIN: dict[str, str] = {}  # name -> who registered it (a dotted path), for the message of a clash
ENTRY_POINTS = "cnnlab.models"  # installed packages offer models here: name = "pkg.module:Class" (or a module)


@dataclass
class ModelConfig:
    """Keys every model accepts; a family's schema subclasses this and adds its own."""

    name: str = "???"  # registered model name; "???" is OmegaConf's "must be given"
    activation: str = "relu"  # relu|leaky_relu|sigmoid|tanh|silu|swish|gelu (swish == silu)
    dropout: float = 0.0  # drop probability, in [0, 1)
    batch_norm: bool = True
    init: str = "kaiming"  # kaiming|pytorch_default

    def validate(self, prefix: str = "model") -> None:
        """Raise ConfigError naming f"{prefix}.<key>" and what is allowed. Subclasses call super()."""
        check_choice(f"{prefix}.name", self.name, available())
        check_choice(f"{prefix}.activation", self.activation, ACTIVATIONS)
        check_range(f"{prefix}.dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        check_choice(f"{prefix}.batch_norm", self.batch_norm, (True, False))
        check_choice(f"{prefix}.init", self.init, INIT_SCHEMES)

    def label(self) -> str:
        """The model as logs, the card and summary.json name it."""
        return self.name

    def is_standard_form(self) -> bool:
        """Whether the card may compare it with its family's published form (not with a custom arch)."""
        return True


def register(name: str, schema: type[ModelConfig], *, replace: bool = False,
             origin: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(cfg, in_channels, num_classes, input_size)` under `name`.

    A name already taken is a ConfigError unless `replace`; the same origin registering again (a
    notebook cell run twice, a module reloaded) replaces its own entry."""
    if not (isinstance(schema, type) and issubclass(schema, ModelConfig) and is_dataclass(schema)):
        raise TypeError(f"schema for {name!r} must be a dataclass subclass of ModelConfig, got {schema!r}")

    def decorator(builder: Builder) -> Builder:
        source = origin or usercode.dotted_name(getattr(builder, "func", builder))  # a partial: its function
        taken = _ORIGIN.get(name)
        if name in _REGISTRY and not replace and taken != source:
            whose = "a cnnlab built-in" if taken and taken.startswith("cnnlab.") else f"registered by {taken}"
            raise ConfigError(f"model name {name!r} is taken ({whose}); register yours under another name, or pass "
                              f"replace=True to register_model to replace it")
        _REGISTRY[name] = (builder, schema)
        _ORIGIN[name] = source
        return builder

    return decorator


def available() -> list[str]:
    """Registered model names, sorted; installed packages' entry points are loaded the first time."""
    _load_entry_points()
    return sorted(_REGISTRY)


SLOTS = ("custom",)  # names that select a model given elsewhere (model._target_), not a model of their own


def family(name: str) -> str:
    """The module a model comes from: vgg for vgg11..vgg19, resnet for resnet11..resnet50, a user's module."""
    available()
    return _ORIGIN[name].rsplit(".", 2)[-2]


def zoo() -> list[str]:
    """The models that build from their name alone: what `cnnlab models` lists."""
    return [name for name in available() if name not in SLOTS]


def _load_entry_points() -> None:
    """Entry points of group cnnlab.models: a module (importing it registers its models) or a class or
    function, registered under the entry point's name. Loaded once, when a name is first looked up."""
    for name, obj in usercode.load_entry_points(ENTRY_POINTS):
        if callable(obj) and name not in _REGISTRY:
            from cnnlab.models.custom import register_model

            try:
                register_model(name)(obj)
            except (ConfigError, TypeError, ValueError) as err:
                usercode.ENTRY_POINT_FAILURES[f"{ENTRY_POINTS}:{name}"] = f"entry point {name}: {err}"


def schema_for(name: str) -> type[ModelConfig]:
    """The config dataclass of model `name`; ConfigError listing the valid names otherwise."""
    failed = usercode.ENTRY_POINT_FAILURES.get(f"{ENTRY_POINTS}:{name}")
    if name not in available() and failed:
        raise ConfigError(f"model.name={name!r} comes from an installed package whose {failed}")
    check_choice("model.name", name, available())
    return _REGISTRY[name][1]


def build_model(
    cfg: ModelConfig, in_channels: int, num_classes: int, input_size: tuple[int, int]
) -> nn.Module:
    """Validate cfg, build the model for (in_channels, input_size) images and num_classes, init it.

    Raises ConfigError for bad config values and for inputs too small for the model (naming the minimum).
    """
    cfg.validate()
    builder, schema = _REGISTRY[cfg.name]
    if not isinstance(cfg, schema):
        # A programming error (wrong dataclass), not bad user input.
        raise TypeError(f"model {cfg.name!r} needs a {schema.__name__}, got {type(cfg).__name__}")
    check_range("in_channels", in_channels, 1)
    check_range("num_classes", num_classes, 1)
    input_size = check_input_size(input_size)
    model = builder(cfg, in_channels, num_classes, input_size)
    init_weights(model, cfg.init, cfg.activation or "relu")  # a user's model may leave activation unset
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; shared parameters are counted once."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total, trainable


# Importing the families registers them; at the bottom because they import register/ModelConfig from here.
from cnnlab.models import alexnet, cifarnet, convnet, googlenet, lenet, nin, resnet, vgg  # noqa: E402,F401
from cnnlab.models import custom  # noqa: E402,F401  (model=custom; register_model for users)
from cnnlab.models.custom import UserModelConfig, register_model  # noqa: E402

__all__ = [
    "ModelConfig",
    "UserModelConfig",
    "available",
    "build_model",
    "count_parameters",
    "family",
    "register",
    "register_model",
    "schema_for",
    "zoo",
]
