"""The comparison across runs: one row per run, ranked, next to the parameters that varied.

It reads only what runs wrote (summary.json, metrics.csv), so it works on a sweep directory,
on any set of run directories, and on sweeps whose jobs failed, diverged or are still running.
"""
from __future__ import annotations

import json
import math
import os.path
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser

from cnnlab.checks import ConfigError, check_choice
from cnnlab.record import Summary, read_summary

# ranking metric -> True when higher is better
RANK_METRICS: dict[str, bool] = {
    "test_acc": True,
    "best_val_acc": True,
    "test_loss": False,
    "final_val_loss": False,
    "final_train_loss": False,
    "gap": False,
    "train_seconds": False,
    "params": False,
}
# paths, display and report switches: never "parameters that varied"
IGNORED_KEYS = frozenset({"dataset.root", "trainer.progress", "report.metric", "report.facet"})
SEED_KEY = "trainer.seed"
# val loss rising after its minimum by less than this (nats, or fraction of a minimum above 1) is noise
OVERFIT_TOLERANCE = 0.01


@dataclass
class ReportConfig:
    """The `report` group: how the comparison written at the end of every multirun is ranked and grouped."""

    metric: str = "test_acc"
    facet: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "report") -> None:
        check_choice(f"{prefix}.metric", self.metric, RANK_METRICS)


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    name: str
    summary: Summary
    params: dict[str, Any]  # flattened resolved config, plus override keys the config lacks
    override_keys: list[str]  # in the order the user wrote them: the report's column order
    metrics: pd.DataFrame | None

    @property
    def status(self) -> str:
        return str(self.summary.status or "unknown")


def find_runs(sources: Sequence[Path]) -> list[Path]:
    """Run directories (those holding summary.json) at or under each source, in job order."""
    found: list[Path] = []
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            raise ConfigError(f"{source} is not a directory; give a sweep directory or run directories")
        if (source / "summary.json").is_file():
            found.append(source)
            continue
        nested = [p.parent for p in source.rglob("summary.json")
                  if not any(part.startswith(".") for part in p.relative_to(source).parts[:-1])]
        if not nested:
            raise ConfigError(f"{source} holds no run directories (none has a summary.json); "
                              "give a sweep directory (outputs/sweeps/...) or run directories (outputs/runs/...)")
        found.extend(sorted(nested, key=_job_order))
    return list(dict.fromkeys(p.resolve() for p in found))


def _job_order(path: Path) -> tuple[str, int, str]:
    head = path.name.split("_", 1)[0]
    return (str(path.parent), int(head) if head.isdigit() else sys.maxsize, path.name)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    root = Path(_common_parent(paths))
    runs = []
    for path in paths:
        try:
            summary = read_summary(path)
        except (OSError, ValueError, TypeError) as err:
            summary = Summary(status="unreadable", error=f"summary.json: {err}")
        overrides = _parse_overrides(summary.overrides or [])
        params = flat_params(summary.config or {})
        params.update({k: v for k, v in overrides.items() if k not in params and f"{k}.name" not in params})
        name = str(path.relative_to(root)) if path != root else path.name
        runs.append(Run(path, name, summary, params, list(overrides), _read_metrics(path)))
    _name_group_choices(runs)
    return runs


def _common_parent(paths: Sequence[Path]) -> str:
    return os.path.commonpath([str(p.parent) for p in paths]) if len(paths) > 1 else str(paths[0].parent)


def _parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`optimizer.lr=1e-3` -> {"optimizer.lr": 0.001}, typed the way Hydra typed it for the run."""
    parser = OverridesParser.create()
    parsed: dict[str, Any] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - an odd override still names its key
            key, _, value = text.lstrip("+~").partition("=")
            parsed[key] = value
            continue
        if not override.is_delete():
            parsed[override.key_or_group] = _plain(override.value())
    return parsed


def _name_group_choices(runs: list[Run]) -> None:
    """A failed run knows `model=vgg11` only from its overrides; the others know it as model.name."""
    keys_with_name = {k[: -len(".name")] for run in runs for k in run.params if k.endswith(".name")}
    for run in runs:
        for group in keys_with_name & set(run.params):
            run.params[f"{group}.name"] = run.params.pop(group)
        run.override_keys = [f"{k}.name" if k in keys_with_name else k for k in run.override_keys]


def flat_params(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run's config as dotted keys, lists as one value (JSON text): what runs are compared by."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """Lists (augmentation ops, VGG arch) compare and print as one value, the same from config or override."""
    return json.dumps(value) if isinstance(value, list) else value


def _read_metrics(path: Path) -> pd.DataFrame | None:
    try:
        metrics = pd.read_csv(path / "metrics.csv")
    except (OSError, ValueError):  # absent (failed before training) or empty
        return None
    return metrics if len(metrics) and "epoch" in metrics else None


def varied_keys(runs: Sequence[Run]) -> list[str]:
    """Keys with two or more distinct values among the runs that have them, in the user's order.

    A key only some runs have (VGG's arch in a VGG-vs-ResNet sweep) varies only if those runs
    disagree on it: the model name column already says the rest.
    """
    ordered = list(dict.fromkeys([k for run in runs for k in run.override_keys] + [k for run in runs for k in run.params]))
    varied = []
    for key in ordered:
        values = {json.dumps(run.params[key], sort_keys=True, default=str) for run in runs if key in run.params}
        if key not in IGNORED_KEYS and len(values) > 1:
            varied.append(key)
    return [key for key in varied if not _implied(key, varied, runs)]


def _implied(key: str, varied: Sequence[str], runs: Sequence[Run]) -> bool:
    """A list-valued key that only follows its group's choice (augmentation.ops with augmentation=cifar,none):
    one change, so one column, the name's; lists the user set themselves stay."""
    group = key.rsplit(".", 1)[0]
    name = f"{group}.name"
    if name not in varied or key == name or any(key in run.override_keys for run in runs):
        return False
    if not any(str(run.params.get(key)).startswith(("[", "{")) for run in runs):  # lists are kept as JSON text
        return False
    pairs = {(json.dumps(run.params.get(name), default=str), json.dumps(run.params.get(key), sort_keys=True, default=str))
             for run in runs}
    return len(pairs) == len({n for n, _ in pairs})  # each choice has one value of it


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """model.activation -> activation, loss.name -> loss; the full key where short names clash."""
    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    counts = pd.Series([short(k) for k in keys]).value_counts()
    return {k: short(k) if counts[short(k)] == 1 else k.removesuffix(".name") for k in keys}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def run_label(run: Run, keys: Sequence[str], names: dict[str, str]) -> str:
    """What tells this run apart: `lr=0.1, activation=tanh`; the directory name if nothing varied."""
    parts = [f"{names[k]}={format_value(run.params.get(k))}" for k in keys]
    return ", ".join(parts) if parts else run.name


def distinct_labels(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, str]:
    """run name -> a label no other of `runs` has: `keys`' values, then whatever else tells runs that
    share them apart (Adam and RAdam at one lr differ in optimizer.name), then the run's directory."""
    names = short_names(keys)
    labels = {run.name: run_label(run, keys, names) for run in runs}
    for label in {v for v in labels.values() if list(labels.values()).count(v) > 1}:
        twins = [run for run in runs if labels[run.name] == label]
        extra = [k for k in varied_keys(twins) if k not in keys]
        extra_names = short_names(extra)
        for run in twins:
            more = ", ".join(f"{extra_names[k]}={format_value(run.params.get(k))}" for k in extra)
            labels[run.name] = ", ".join(p for p in (label if keys else "", more) if p) or run.name
    if len(set(labels.values())) < len(labels):  # still twins (same config, e.g. a repeated run): the directory
        labels = {name: f"{label} ({name})" if list(labels.values()).count(label) > 1 else label
                  for name, label in labels.items()}
    return labels


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _at_epoch(metrics: pd.DataFrame | None, epoch: Any, column: str) -> float | None:
    if metrics is None or epoch is None or column not in metrics:
        return None
    rows = metrics.loc[metrics["epoch"] == epoch, column]
    return _finite(rows.iloc[-1]) if len(rows) else None


def run_row(run: Run, keys: Sequence[str]) -> dict[str, Any]:
    """One row of sweep_summary.csv."""
    s, m = run.summary, run.metrics
    last = m.iloc[-1] if m is not None else {}
    best_epoch = s.best_epoch
    train_acc, val_acc = _at_epoch(m, best_epoch, "train_acc"), _at_epoch(m, best_epoch, "val_acc")
    row: dict[str, Any] = {"run": run.name, **{k: run.params.get(k) for k in keys}, "status": run.status}
    row.update(
        best_epoch=best_epoch,
        best_val_acc=s.best_val_acc,
        test_acc=s.test_acc,
        test_loss=s.test_loss,
        final_train_loss=_first(s.final_train_loss, last.get("train_loss")),
        final_val_loss=_first(s.final_val_loss, last.get("val_loss")),
        # generalization gap where the run was scored: train minus val accuracy at the best epoch
        gap=None if train_acc is None or val_acc is None else train_acc - val_acc,
        **overfitting(m),
        params=s.params_total,
        train_seconds=s.train_seconds,
        seconds_per_epoch=_mean(m, "epoch_seconds"),  # training + validation, as metrics.csv times it
        epochs=_first(s.epochs_completed, len(m) if m is not None else 0),
        error=s.error,
        # the doctor's standing verdict: collapsed at chance level (trainer.stop_when_stuck stops such runs)
        stuck=bool((s.diagnosis or {}).get("stuck")),
        diagnosis=(s.diagnosis or {}).get("cause"),
        path=str(run.path),
    )
    return row


def _mean(metrics: pd.DataFrame | None, column: str) -> float | None:
    if metrics is None or column not in metrics:
        return None
    values = pd.to_numeric(metrics[column], errors="coerce").dropna()
    return round(float(values.mean()), 4) if len(values) else None


def _first(value: Any, fallback: Any) -> Any:
    """summary.json's value, else what metrics.csv says (files from before a field existed)."""
    return fallback if value is None else value


def overfitting(metrics: pd.DataFrame | None) -> dict[str, Any]:
    """Where val loss was lowest, how far it rose by the last epoch, and whether that is overfitting.

    Overfitting: val loss rose by more than OVERFIT_TOLERANCE nats (or that fraction of its
    minimum, when the minimum is above 1) while train loss kept falling. Both rising is a run that fails to train, not one
    that memorises.
    """
    none = {"min_val_loss": None, "min_val_loss_epoch": None, "val_loss_rise": None, "overfit": False}
    if metrics is None or "val_loss" not in metrics:
        return none
    val = pd.to_numeric(metrics["val_loss"], errors="coerce")
    val = val.where(np.isfinite(val))
    if val.notna().sum() == 0:
        return none
    lowest = val.idxmin()
    final = val.iloc[-1]
    rise = float(final - val[lowest]) if pd.notna(final) else math.inf  # a NaN at the end: it blew up
    train = pd.to_numeric(metrics.get("train_loss"), errors="coerce")
    train_fell = train is not None and bool(train.iloc[-1] < train[lowest])
    return {
        "min_val_loss": float(val[lowest]),
        "min_val_loss_epoch": int(metrics["epoch"][lowest]),
        "val_loss_rise": rise,
        "overfit": train_fell and math.isfinite(rise) and rise > OVERFIT_TOLERANCE * max(1.0, val[lowest]),
    }


def summary_table(runs: Sequence[Run], metric: str = "test_acc", keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run, ranked by `metric`; runs without a value for it (failed, diverged) last.

    `rank` numbers the runs that have the metric; `mark` flags the best and the worst of them.
    """
    check_choice("report.metric", metric, RANK_METRICS)
    keys = varied_keys(runs) if keys is None else keys
    table = pd.DataFrame([run_row(run, keys) for run in runs])
    value = pd.to_numeric(table[metric], errors="coerce")
    value = value.where(np.isfinite(value))
    order = value.sort_values(ascending=not RANK_METRICS[metric], na_position="last", kind="stable").index
    table = table.loc[order].reset_index(drop=True)
    ranked = value.loc[order].notna().to_numpy()
    table.insert(0, "rank", pd.array([i + 1 if r else None for i, r in enumerate(ranked)], dtype="Int64"))
    marks = [""] * len(table)
    if ranked.any():
        last = int(np.flatnonzero(ranked)[-1])
        marks[last] = "worst"
        marks[0] = "best"  # one ranked run is best, not worst
    table.insert(1, "mark", marks)
    return table


def seed_aggregate(table: pd.DataFrame, keys: Sequence[str], metric: str) -> pd.DataFrame | None:
    """Mean and spread over seeds of each setting, when the seed is one of the varied keys."""
    if SEED_KEY not in keys:
        return None
    by = [k for k in keys if k != SEED_KEY]
    done = table[table["status"] == "completed"]
    if done.empty:
        return None
    columns = list(dict.fromkeys([metric, "test_acc", "best_val_acc", "gap", "train_seconds"]))
    numbers = done[columns].apply(pd.to_numeric, errors="coerce")
    grouped = numbers.groupby([done[k].astype(str) for k in by] if by else np.zeros(len(done)), sort=False)
    agg = grouped.agg(["mean", "std"])
    agg.columns = [f"{col}_{stat}" for col, stat in agg.columns]
    agg.insert(0, "seeds", grouped.size())
    agg = agg.reset_index(drop=not by)
    return agg.sort_values(f"{metric}_mean", ascending=not RANK_METRICS[metric], kind="stable").reset_index(drop=True)
