"""Config errors and the small checks every config schema uses.

A ConfigError is the one exception type for bad user input: the CLI prints its
message as one paragraph, without a traceback, and exits with status 2.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Bad user input: the message names the key and the valid choices or range."""


class Refused(SystemExit):
    """A run or sweep refused before it began: exit status 2 with `message` (the CLI prints it; the
    Python API raises it as a ConfigError). A SystemExit, so Hydra passes it through untouched."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(
    key: str,
    value: float | int | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise a ConfigError unless low <= value <= high (bounds optional, open or closed)."""
    if value is None:
        raise ConfigError(f"{key} must be set")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "" if low is None else f"{'[' if low_inclusive else '('}{low}"
        right = "" if high is None else f"{high}{']' if high_inclusive else ')'}"
        if low is None:
            wanted = f"{'<=' if high_inclusive else '<'} {high}"
        elif high is None:
            wanted = f"{'>=' if low_inclusive else '>'} {low}"
        else:
            wanted = f"in {left}, {right}"
        raise ConfigError(f"{key}={value!r} is out of range: it must be {wanted}")


def is_whole(value: Any) -> bool:
    """An int, or a float with no fractional part (YAML and the command line give 5.0 for 5 at times); not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def under(key: str, keys: Iterable[str]) -> bool:
    """Whether a dotted config key is one of `keys` or inside one (trainer.resume, viz.layer under viz)."""
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def importable(module: str) -> bool:
    """Whether `module` can be imported, without importing it: optional extras are checked this way.

    find_spec returns None for a module set to None in sys.modules (how tests hide one) and raises
    for a parent package that is not installed."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unwritable_reason(path: Path) -> str | None:
    """Why folder `path` cannot be created or written to, or None if it can.

    Nothing is created: the Hydra callback checks the run directory before Hydra creates it;
    evaluate and predict check their out= with it before any work is done."""
    probe = Path(path).absolute()
    while not probe.exists():  # the nearest existing ancestor decides
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None
