"""A search space from Hydra's override grammar, as Hydra's Optuna sweeper reads it:

    'optimizer.lr=tag(log, interval(1e-4, 1))'   a float, sampled on a log scale
    'optimizer.momentum=interval(0.8, 0.99)'     a float, uniform
    'trainer.batch_size=int(interval(16, 256))'  an int (interval() alone gives floats, as in Hydra)
    'model.width=range(16, 129, 16)'             an int from 16, 32, ... 128
    'model.activation=choice(relu, tanh)'        one of the choices (also: relu,tanh)

One deliberate difference from Hydra's plugin: range(a, b, step) searches exactly the values the
basic sweeper's grid runs, so b is excluded (as in Python). Everything else on the command line is
fixed for every trial. A sampled float is rounded to FLOAT_DIGITS significant digits before it
becomes an override: what a run's config records is what it trained with.

Parsing needs no Optuna; `distribution()` builds Optuna's object when the sweeper runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException

from cnnlab.checks import ConfigError

FLOAT_DIGITS = 6  # significant digits of a sampled float: far finer than any hyperparameter matters
TAGS = ("log",)  # the tags a search expression may carry
GRAMMAR = ("tag(log, interval(low, high)), interval(low, high), int(interval(low, high)), range(start, stop[, step]) "
           "or choice(a, b, ...)")


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int between low and high, or one of `choices` (override strings)."""

    key: str  # as written, with any + prefix: the override the trial gets is f"{key}={value}"
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The key without + or ~: how the study, the report and the job directories name it."""
        return self.key.lstrip("+~")

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return FloatDistribution(self.low, self.high, step=self.step, log=self.log)

    def override(self, value: Any) -> str:
        """The trial's override for a sampled value."""
        if self.kind == "float":
            value = float(f"{float(value):.{FLOAT_DIGITS}g}")
        return f"{self.key}={value}"

    def extremes(self) -> list[str]:
        """Overrides that together cover what must be valid: every choice, or both ends of the interval."""
        if self.kind == "choice":
            return [f"{self.key}={choice}" for choice in self.choices]
        return [self.override(self.low), self.override(self.high)]

    def grid(self) -> list[Any] | None:
        """The values a grid sampler walks; None for a continuous interval."""
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None:
            return None
        count = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [float(f"{v:.12g}") for v in values]


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys, and the overrides every trial shares, in command-line order."""

    params: tuple[Param, ...]
    fixed: tuple[str, ...]

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        return [*self.fixed, *(p.override(values[p.name]) for p in self.params)]

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's space; ConfigError when a key is a continuous interval."""
        continuous = [p.name for p in self.params if p.grid() is None]
        if continuous:
            raise ConfigError(f"hydra.sweeper.sampler=grid walks listed values, but {', '.join(continuous)} "
                              f"{'is an interval' if len(continuous) == 1 else 'are intervals'}; give choice(...) or "
                              f"range(start, stop, step) values, or choose sampler tpe or random")
        return {p.name: p.grid() for p in self.params}

    def check_jobs(self) -> list[list[str]]:
        """Jobs that together hold every choice and both ends of every interval, to check before the
        search starts: the first at every key's first extreme, then one per other extreme."""
        first = [p.extremes()[0] for p in self.params]
        jobs = [[*self.fixed, *first]]
        for i, param in enumerate(self.params):
            jobs += [[*self.fixed, *first[:i], other, *first[i + 1:]] for other in param.extremes()[1:]]
        return jobs

    def describe(self) -> list[str]:
        """The search as override strings, to compare a study's search with a re-run's."""
        return [f"{p.name}:{p.kind}:{p.low}:{p.high}:{p.step}:{p.log}:{','.join(p.choices)}" for p in self.params]


def parse_space(overrides: list[str]) -> SearchSpace:
    """The search space of a command line (a preset's hydra.sweeper.params first); ConfigError for a
    bad expression, naming it and the valid forms. A key given twice takes its last form, as in Hydra's
    sweepers: `+experiment=lr_search optimizer.lr=0.05` fixes the lr the preset searches."""
    parser = OverridesParser.create()
    last: dict[str, Param | str] = {}  # key -> its search, or its fixed override
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:  # a syntax error, or Hydra refusing the arguments (choice())
            raise ConfigError(f"{text!r} is not a search expression: {str(err).splitlines()[0]}. "
                              f"Use {GRAMMAR}") from None
        key = override.get_key_element().lstrip("+~")
        last.pop(key, None)  # the later one wins, and takes the later place
        last[key] = _param(override, text) if override.is_sweep_override() else text
    params = tuple(v for v in last.values() if isinstance(v, Param))
    if not params:
        raise ConfigError("hydra/sweeper=optuna needs at least one key to search, e.g. "
                          "'optimizer.lr=tag(log, interval(1e-4, 1))'; the search expressions are " + GRAMMAR)
    return SearchSpace(params, tuple(v for v in last.values() if isinstance(v, str)))


def _param(override: Override, text: str) -> Param:
    key = override.get_key_element()
    value = override.value()
    tags = set(getattr(value, "tags", set()))
    unknown = sorted(tags - set(TAGS))
    if unknown:
        raise ConfigError(f"{text!r}: the tag {', '.join(unknown)} means nothing to the search; the only tag is "
                          f"log, as in tag(log, interval(1e-4, 1))")
    log = "log" in tags
    if isinstance(value, IntervalSweep):
        kind = "int" if isinstance(value.start, int) and isinstance(value.end, int) else "float"
        return _checked(Param(key, kind, value.start, value.end, log=log), text)
    if isinstance(value, RangeSweep) and not value.shuffle:
        return _checked(_range(key, value, log, text), text)
    if getattr(value, "shuffle", False):  # a different order each time: the same command would not be the same study
        raise ConfigError(f"{text!r}: shuffle() means nothing to a search, whose sampler picks the order; "
                          f"use choice(...) or range(...)")
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        if log:
            raise ConfigError(f"{text!r}: log applies to interval() and range(), not to a list of choices")
        choices = tuple(str(v) for v in override.sweep_iterator(transformer=Transformer.str))
        return Param(key, "choice", choices=choices)
    raise ConfigError(f"{text!r} cannot be searched (a {type(value).__name__}); use {GRAMMAR}")


def _range(key: str, value: RangeSweep, log: bool, text: str) -> Param:
    start, stop, step = value.start, value.stop, value.step
    if step is None or step <= 0 or stop is None or start is None or stop <= start:
        raise ConfigError(f"{text!r} holds no values to search: range(start, stop, step) needs start < stop and a "
                          f"step > 0; stop is excluded, as in the grid")
    count = math.ceil((stop - start) / step - 1e-9)  # the values the grid would run: start, start+step, ... < stop
    kind = "int" if all(isinstance(v, int) for v in (start, stop, step)) else "float"
    high = start + (count - 1) * step
    return Param(key, kind, start, high if kind == "int" else float(f"{high:.12g}"), step=step, log=log)


def _checked(param: Param, text: str) -> Param:
    if not param.low < param.high:
        raise ConfigError(f"{text!r}: the low end ({param.low}) must be below the high end ({param.high})")
    if param.log and param.low <= 0:
        raise ConfigError(f"{text!r}: a log scale needs a low end above 0, got {param.low}")
    if param.log and param.step is not None and (param.kind == "float" or param.step != 1):
        raise ConfigError(f"{text!r}: a log scale takes no step; use tag(log, int(interval(low, high))) for integers")
    return param
