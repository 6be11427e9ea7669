"""cnnlab: a config-driven experiment runner for training convolutional networks.

From Python and notebooks (see cnnlab.api):

    import cnnlab
    run = cnnlab.train("model=vgg11", "dataset=cifar10", "trainer.epochs=5")
    sweep = cnnlab.sweep("optimizer.lr=0.1,0.01", "model.activation=relu,tanh")
    run = cnnlab.load_run("outputs/runs/...")

    @cnnlab.register_model("tinyvgg")   # model=tinyvgg, with model.<key> for each constructor argument
    class TinyVGG(nn.Module): ...

The names below load on first use, so `cnnlab --help` and training stay as quick to start as before.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "cnnlab.api",
    "sweep": "cnnlab.api",
    "load_run": "cnnlab.api",
    "Run": "cnnlab.api",
    "Sweep": "cnnlab.api",
    "ConfigError": "cnnlab.checks",
    "register_model": "cnnlab.models",
    "UserModelConfig": "cnnlab.models",
    "register_dataset": "cnnlab.data",
    "make_activation": "cnnlab.models.layers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
