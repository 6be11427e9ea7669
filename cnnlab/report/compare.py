"""The comparison report of a sweep or any set of runs, written as files into one directory.

    sweep_summary.csv   one row per run: varied parameters, status, metrics, gap, overfitting
    sweep_summary.md    the same ranked table with best/worst, seed means, overfitting, failures, plots
    sweep_metrics.csv   every run's metrics.csv stacked, with its varied parameters (for your own plots)
    sweep_seeds.csv     mean and std over seeds per setting, when trainer.seed varied
    sweep_curves.png    loss and accuracy vs epoch, all runs overlaid, one row per facet
    sweep_test_acc.png  test accuracy per run
    sweep_confusion.png every run's confusion matrix
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cnnlab.checkpoint import atomic_write_text
from cnnlab.checks import ConfigError
from cnnlab.report.sweep import (
    RANK_METRICS, Run, distinct_labels, find_runs, load_runs, seed_aggregate, short_names, summary_table, varied_keys,
)
from cnnlab.report.sweep_plots import accuracy_bars_figure, confusion_grid_figure, curves_figure, params_figure

MARKDOWN_COLUMNS = (
    "best_epoch", "best_val_acc", "test_acc", "test_loss", "final_train_loss", "final_val_loss", "gap",
    "min_val_loss_epoch", "val_loss_rise", "stuck", "params", "train_seconds",
)


@dataclass
class Report:
    out: Path
    table: pd.DataFrame
    keys: list[str]  # the parameters that varied
    files: list[Path]
    notes: list[str]


def write_report(sources: Sequence[Path], out: Path, metric: str = "test_acc", facet: Sequence[str] = ()) -> Report:
    """Compare the runs in `sources` (sweep directories or run directories) and write the report to `out`."""
    runs = load_runs(find_runs(sources))
    keys = varied_keys(runs)
    facet, notes = resolve_facet(facet, keys, runs)
    table = summary_table(runs, metric, keys)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write the report to {out}: {err.strerror or err}; choose another directory with --out") from None

    labels = distinct_labels(runs, keys)
    files = [out / "sweep_summary.csv", out / "sweep_metrics.csv"]
    table.to_csv(files[0], index=False)
    stacked_metrics(runs, keys).to_csv(files[1], index=False)
    seeds = seed_aggregate(table, keys, metric)
    if seeds is not None:
        files.append(out / "sweep_seeds.csv")
        seeds.to_csv(files[-1], index=False)
    per_class = per_class_table([_by_name(runs, n) for n in table["run"]])
    if per_class is not None:
        files.append(out / "sweep_per_class.csv")
        per_class.to_csv(files[-1])

    figures = {
        "sweep_curves.png": curves_figure(runs, keys, facet) if any(r.metrics is not None for r in runs) else None,
        "sweep_params.png": params_figure(table, keys, metric),
        "sweep_test_acc.png": accuracy_bars_figure(table, labels),
        "sweep_confusion.png": confusion_grid_figure([_by_name(runs, n) for n in table["run"]], labels),
    }
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            files.append(out / name)

    images = [f.name for f in files if f.suffix == ".png"]
    sections = [_per_class_markdown(per_class)] if per_class is not None else []
    markdown = render_markdown(sources, table, keys, metric, seeds, notes, images, labels, sections)
    atomic_write_text(out / "sweep_summary.md", markdown)
    files.insert(1, out / "sweep_summary.md")
    return Report(out, table, keys, files, notes)


def per_class_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Test accuracy per class (rows) and run (columns, in ranking order), from each run's
    per_class_accuracy.csv; None unless at least one run has one and they share their classes."""
    columns = {}
    for run in runs:
        path = run.path / "per_class_accuracy.csv"
        if path.is_file():
            columns[run.name] = pd.read_csv(path).set_index("class")["accuracy"]
    if not columns or len({tuple(c.index) for c in columns.values()}) > 1:
        return None
    table = pd.DataFrame(columns)
    table.index.name = "class"
    return table


def _per_class_markdown(table: pd.DataFrame, shown: int = 20) -> str:
    if len(table) > shown:
        return (f"## Per-class test accuracy\n\n{len(table)} classes, one row each per run: "
                f"`sweep_per_class.csv`.\n")
    return "## Per-class test accuracy\n\n" + table.apply(lambda c: c.map(lambda v: f"{v:.1%}")).to_markdown() + "\n"


def _by_name(runs: Sequence[Run], name: str) -> Run:
    return next(run for run in runs if run.name == name)


def resolve_facet(facet: Sequence[str], keys: Sequence[str], runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """Full keys for facet names given in full or short (`activation`, `loss`).

    A key no run has is a typo and an error; a key that did not vary in these runs is dropped
    with a note (a preset's facet still works when you sweep less than it does).
    """
    known = list(dict.fromkeys(k for run in runs for k in run.params))
    names = short_names(known)
    resolved, notes = [], []
    for wanted in facet:
        matches = [k for k in known if wanted in (k, names[k], k.removesuffix(".name"))]
        if not matches:
            raise ConfigError(f"report.facet: no run has a key {wanted!r}; the keys that varied are: "
                              f"{', '.join(keys) or 'none'}")
        key = matches[0]
        if key in keys:
            resolved.append(key)
        else:
            notes.append(f"facet {key} had a single value in these runs, so the curves are not split by it")
    return list(dict.fromkeys(resolved)), notes


def stacked_metrics(runs: Sequence[Run], keys: Sequence[str]) -> pd.DataFrame:
    """Every run's per-epoch metrics in one long table: run, the varied parameters, then metrics.csv."""
    frames = [run.metrics.assign(**{"run": run.name, "status": run.status},
                                 **{k: [run.params.get(k)] * len(run.metrics) for k in keys})
              for run in runs if run.metrics is not None]
    if not frames:
        return pd.DataFrame(columns=["run", "status", *keys, "epoch"])
    stacked = pd.concat(frames, ignore_index=True)
    first = ["run", "status", *keys]
    return stacked[first + [c for c in stacked.columns if c not in first]]


def render_markdown(sources: Sequence[Path], table: pd.DataFrame, keys: Sequence[str], metric: str,
                    seeds: pd.DataFrame | None, notes: Sequence[str], images: Sequence[str],
                    labels: dict[str, str], sections: Sequence[str] = ()) -> str:
    names = short_names(keys)
    all_runs = list(table["run"])

    def describe(run: str) -> str:
        short = _short_run(run, all_runs)
        where = f"job {short}" if short != run else f"`{run}`"
        return where if labels[run] == run else f"{labels[run]} ({where})"

    counts = table["status"].value_counts()
    status_text = ", ".join(f"{n} {status}" for status, n in counts.items())
    where = ", ".join(f"`{Path(s).resolve()}`" for s in sources)
    direction = "higher" if RANK_METRICS[metric] else "lower"
    lines = [
        "# Sweep report", "",
        f"{len(table)} runs from {where} ({status_text}), ranked by **{metric}** ({direction} is better).",
        "Varied: " + (", ".join(f"`{k}`" for k in keys) if keys else "nothing (the runs share one config)") + ".", "",
    ]
    for mark in ("best", "worst"):
        row = table[table["mark"] == mark]
        if len(row):
            row = row.iloc[0]
            shown = dict.fromkeys([metric, "test_acc", "gap"])
            values = ", ".join(f"{c} {_cell(row[c], c)}" for c in shown)
            lines.append(f"- **{mark.capitalize()}:** {describe(row['run'])}: {values}")
    lines += ["", _markdown_table(table, keys, names), ""]

    if seeds is not None:
        lines += ["## Mean over seeds", "", _seed_table(seeds, keys, names), ""]

    lines += _overfitting(table, describe) + _stuck(table, describe) + _unfinished(table, describe)
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    lines += list(sections)
    if images:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in images], ""]
    return "\n".join(lines)


def _overfitting(table: pd.DataFrame, describe: Callable[[str], str]) -> list[str]:
    overfit = table[table["overfit"]]
    lines = ["## Overfitting", ""]
    if overfit.empty:
        lines.append("No run's val loss rose after its lowest point while train loss kept falling.")
    else:
        lines.append("Val loss reached its lowest point before the last epoch and rose afterwards "
                     "(▼ in sweep_curves.png); these runs trained past their best:")
        lines.append("")
        for _, row in overfit.sort_values("val_loss_rise", ascending=False).iterrows():
            lines.append(f"- {describe(row['run'])}: lowest val loss {row['min_val_loss']:.4g} at epoch "
                         f"{int(row['min_val_loss_epoch'])} of {int(row['epochs'])}, then {row['val_loss_rise']:+.4g}")
    return lines + [""]


def _stuck(table: pd.DataFrame, describe: Callable[[str], str]) -> list[str]:
    """Runs the doctor found stuck at their last check: they may say completed, yet did not learn."""
    stuck = table[table["stuck"]]
    if stuck.empty:
        return []
    lines = ["## Stuck runs", "", "The doctor found these runs stuck at chance level at its last check "
             "(`diagnosis` in their summary.json has the numbers and the fixes):", ""]
    lines += [f"- **{row['status']}** {describe(row['run'])}: {row['diagnosis']}" for _, row in stuck.iterrows()]
    return lines + [""]


def _unfinished(table: pd.DataFrame, describe: Callable[[str], str]) -> list[str]:
    pruned = table[table["status"] == "pruned"]  # a search stopped them on purpose: counted, not listed
    unfinished = table[~table["status"].isin(["completed", "pruned"])]
    lines = [f"{len(pruned)} of {len(table)} runs were pruned by the search: stopped early, after the epoch in their "
             "`stopped_at_epoch`, and scored with the weights they had (see search_summary.md).", ""] if len(pruned) else []
    if unfinished.empty:
        return lines
    lines += ["## Runs that did not complete", ""]
    for _, row in unfinished.iterrows():
        error = f": {row['error']}" if isinstance(row["error"], str) and row["error"] else ""
        lines.append(f"- **{row['status']}** {describe(row['run'])}{error}")
    return lines + [""]


def _short_run(name: str, all_names: Sequence[str]) -> str:
    """Job number alone when every run is a sweep job (`3_optimizer.lr=0.1` -> 3)."""
    jobs = [re.match(r"^(\d+)_", n) for n in all_names]
    return jobs[list(all_names).index(name)].group(1) if all(jobs) else name


def _markdown_table(table: pd.DataFrame, keys: Sequence[str], names: dict[str, str]) -> str:
    shown = pd.DataFrame({
        "rank": [_cell(v, "rank") for v in table["rank"]],
        "": table["mark"],
        "run": [_short_run(n, list(table["run"])) for n in table["run"]],  # the job number in a sweep
        **{names[k]: [_cell(v, k) for v in table[k]] for k in keys},
        "status": table["status"],
        **{c: [_cell(v, c) for v in table[c]] for c in MARKDOWN_COLUMNS},
    })
    return shown.to_markdown(index=False)


def _seed_table(seeds: pd.DataFrame, keys: Sequence[str], names: dict[str, str]) -> str:
    shown = pd.DataFrame({names[k]: seeds[k] for k in keys if k in seeds})
    shown["seeds"] = seeds["seeds"]
    for column in (c.removesuffix("_mean") for c in seeds.columns if c.endswith("_mean")):
        shown[column] = [f"{_cell(m, column)} ± {_cell(s, column)}" for m, s in zip(seeds[f"{column}_mean"], seeds[f"{column}_std"])]
    return shown.to_markdown(index=False)


def _cell(value: Any, column: str) -> str:
    """Readable table cells: thousands separators for counts, 4 significant digits for metrics."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    if column == "stuck":
        return "stuck" if value else ""
    if column == "params":
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if column not in ("best_epoch", "min_val_loss_epoch", "epochs", "rank") else f"{value:.0f}"
    return str(value)
