"""Comparison figures across runs: overlaid curves (faceted), test accuracy bars, confusion matrices.

Each function returns its Figure so the caller decides where it goes (and tests can inspect it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # the object API: no backend chosen (see report/run.py)
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from cnnlab.report.sweep import SEED_KEY, Run, distinct_labels, format_value, overfitting, run_label, short_names

STATUS_COLORS = {"completed": "tab:blue", "diverged": "tab:orange", "failed": "tab:red", "killed": "tab:red",
                 "interrupted": "tab:purple", "stuck": "tab:brown", "pruned": "tab:olive"}
MAX_CONFUSION_PANELS = 48  # beyond this the panels are too small to read; the best-ranked are shown


def curves_figure(runs: Sequence[Run], keys: Sequence[str], facet: Sequence[str] = ()) -> Figure:
    """Loss and accuracy against epoch for every run with metrics: val solid, train dashed.

    One row of panels per combination of the `facet` keys' values, one line (colour) per
    setting of the other varied keys, the same colour in every row. A triangle marks each
    run's lowest val loss when the loss rose after it (overfitting).
    """
    plotted = [run for run in runs if run.metrics is not None]
    names = short_names(keys)
    line_keys = [k for k in keys if k not in facet]
    groups = _facet_groups(plotted, facet)
    labels = list(dict.fromkeys(run_label(run, line_keys, names) for run in plotted))
    colors = dict(zip(labels, _palette(len(labels))))  # one setting, one colour, in every row

    fig = Figure(figsize=(13, 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (title, members), (ax_loss, ax_acc) in zip(groups, axes):
        for run in members:
            label = run_label(run, line_keys, names)
            m = run.metrics
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
                for split, style in (("val", "-"), ("train", "--"), ("test", ":")):  # test: test_every_epoch
                    column = f"{split}_{metric}"
                    if column in m and m[column].notna().any():
                        (line,) = ax.plot(m["epoch"], m[column], style, color=colors[label], lw=1.4,
                                          marker="o" if split == "val" else None, markersize=2.5)
                        line.set_gid(run.name)  # which run a line belongs to, for readers of the figure
            marker = overfitting(m)
            if marker["overfit"]:
                ax_loss.plot(marker["min_val_loss_epoch"], marker["min_val_loss"], "v", color=colors[label],
                             markersize=9, markeredgecolor="black")
        for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.set_title(f"{title}: {what}" if title else what, fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        legend = distinct_labels(members, line_keys)  # unique within the row, whatever it takes
        _legend(ax_acc, [(colors[run_label(run, line_keys, names)], legend[run.name]) for run in members])
    tested = any("test_acc" in run.metrics for run in plotted)
    fig.suptitle(f"val solid, train dashed{', test dotted' if tested else ''}; ▼ lowest val loss of a run that "
                 f"overfitted", fontsize=10)
    return fig


def _facet_groups(runs: Sequence[Run], facet: Sequence[str]) -> list[tuple[str, list[Run]]]:
    if not facet:
        return [("", list(runs))]
    names = short_names(facet)
    values = [list(dict.fromkeys(format_value(run.params.get(k)) for run in runs)) for k in facet]
    groups = []
    for combo in product(*values):
        members = [run for run in runs if tuple(format_value(run.params.get(k)) for k in facet) == combo]
        if members:
            groups.append((", ".join(f"{names[k]}={v}" for k, v in zip(facet, combo)), members))
    return groups


def _palette(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def _legend(ax: Axes, entries: list[tuple]) -> None:
    handles = [Line2D([], [], color=color, lw=2, label=label) for color, label in entries]
    # beside the panel, never on it: no curve is hidden behind a legend
    ax.legend(handles=handles, fontsize=8 if len(handles) <= 8 else 7, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def accuracy_bars_figure(table: pd.DataFrame, labels: dict[str, str]) -> Figure:
    """Test accuracy per run in ranking order, best at the top, coloured by status."""
    acc = pd.to_numeric(table["test_acc"], errors="coerce").fillna(0.0)
    fig = Figure(figsize=(10, 1.2 + 0.38 * len(table)))
    ax = fig.subplots()
    y = np.arange(len(table))[::-1]
    colors = [STATUS_COLORS.get(status, "tab:gray") for status in table["status"]]
    ax.barh(y, acc, color=colors)
    for yi, value, status in zip(y, acc, table["status"]):
        text = f"{value:.4f}" if status == "completed" else f"{status} {value:.4f}" if value else status
        ax.text(value + 0.005, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, [labels[name] for name in table["run"]], fontsize=8)
    ax.set_xlim(0, min(1.15, acc.max() * 1.15 + 0.05))  # room for the value labels
    ax.set_xlabel("test accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Test accuracy per run")
    fig.tight_layout()
    return fig


def confusion_grid_figure(runs: Sequence[Run], labels: dict[str, str]) -> Figure | None:
    """Each run's test confusion matrix as row rates (fraction of each true class), side by side."""
    shown = [run for run in runs if (run.path / "confusion_matrix.csv").is_file()][:MAX_CONFUSION_PANELS]
    if not shown:
        return None
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, run in zip(axes.flat, shown):
        matrix = pd.read_csv(run.path / "confusion_matrix.csv", index_col=0)
        counts = matrix.to_numpy(dtype=float)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        k = len(matrix)
        if k <= 10:
            ax.set_xticks(range(k), [str(c)[:8] for c in matrix.columns], rotation=90, fontsize=6)
            ax.set_yticks(range(k), [str(c)[:8] for c in matrix.index], fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{labels[run.name]}\nacc {accuracy:.3f}", fontsize=7)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of true class")
    fig.suptitle("Test confusion matrices (rows: true class, columns: predicted)", fontsize=10)
    return fig


LOG_SCALE_KEYS = ("lr", "weight_decay")  # searched over decades: a log axis (as are values spanning 100x)


def numeric_keys(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The varied keys whose values are numbers (not the seed: runs over seeds are averaged instead)."""
    found = []
    for key in keys:
        values = [v for v in table[key] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if key != SEED_KEY and numbers and len(set(values)) > 1:
            found.append(key)
    return found


def params_figure(table: pd.DataFrame, keys: Sequence[str], metric: str) -> Figure | None:
    """How the metric depends on each numeric swept key: one line per setting of the other keys (the mean
    over seeds); with two numeric keys, also a heatmap of the two (the mean over everything else)."""
    numeric = numeric_keys(table, keys)
    if not numeric:
        return None
    names = short_names(keys)
    data = table.assign(**{metric: pd.to_numeric(table[metric], errors="coerce")})
    panels = len(numeric) + (len(numeric) == 2)
    fig = Figure(figsize=(6.5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, key in zip(axes, numeric):
        others = [k for k in keys if k not in (key, SEED_KEY)]
        lines = data.assign(_line=[", ".join(f"{names[k]}={format_value(v)}" for k, v in zip(others, row))
                                   for row in data[others].itertuples(index=False)] if others else "")
        means = lines.groupby(["_line", key], sort=False)[metric].mean().reset_index()
        entries = []
        for (label, rows), color in zip(means.groupby("_line", sort=False), _palette(means["_line"].nunique())):
            rows = rows.sort_values(key)
            ax.plot(rows[key], rows[metric], "-o", color=color, markersize=4)
            entries.append((color, label or metric))
        _scale(ax, key, means[key].astype(float))
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} against {names[key]}")
        ax.grid(alpha=0.3)
        if others:
            _legend(ax, entries)
    if len(numeric) == 2:
        _heatmap(axes[-1], data, numeric, metric)
    return fig


def _scale(ax: Axes, key: str, values: pd.Series) -> None:
    """A log axis for lr and weight decay, or values spanning 100x; symlog where 0 is one of them (no decay)."""
    positive = values[values > 0]
    if positive.empty or not (key.rsplit(".", 1)[-1] in LOG_SCALE_KEYS or positive.max() / positive.min() >= 100):
        return
    if (values <= 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    else:
        ax.set_xscale("log")


def _heatmap(ax: Axes, data: pd.DataFrame, pair: Sequence[str], metric: str) -> None:
    grid = data.pivot_table(index=pair[0], columns=pair[1], values=metric, aggfunc="mean")
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [format_value(v) for v in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [format_value(v) for v in grid.index])
    ax.set(xlabel=pair[1], ylabel=pair[0], title=f"{metric} (mean over the other keys)")
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color="white")
    ax.figure.colorbar(image, ax=ax, label=metric)
