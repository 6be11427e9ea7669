"""Config errors and the small checks every config schema uses.

A ConfigError is the one exception type for bad user input: the CLI prints its
message as one paragraph, without a traceback, and exits with status 2.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """Bad user input: the message names the key and the valid choices or range."""


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
