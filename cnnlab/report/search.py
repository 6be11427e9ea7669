"""What a search found (hydra/sweeper=optuna), written into its sweep dir next to the usual sweep report:

    search_summary.md     the best trial and the command that reproduces it, importances, every trial
    search_trials.csv     one row per trial: state, cnnlab status, value, epochs trained, parameters
    search_history.png    the metric of every trial in order, and the best so far
    search_importances.png  which parameters mattered (Optuna's default evaluator, PED-ANOVA)
    search_parallel.png   parallel coordinates of the parameters, coloured by the metric
    search_slice.png      the metric against each parameter

The figures are Optuna's matplotlib visualisations. The study is read from its storage, so this
works on a finished, stopped or still-running search (`cnnlab report SWEEP_DIR`).
"""
from __future__ import annotations

import csv
import shlex
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.record import read_summary
from cnnlab.report import unless_it_fails
from cnnlab.search.settings import SearchSettings
from cnnlab.search.trial import open_study

MIN_FOR_IMPORTANCE = 3  # completed trials below which importances say nothing


@dataclass
class Findings:
    """The search's result as the console shows it at the end of the sweep."""

    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_search_report(sweep_dir: Path, sweeper: Mapping[str, Any], epochs: int) -> Findings:
    """The search's files in sweep_dir; the lines that name the best trial and how to reproduce it."""
    settings = SearchSettings.from_config(sweeper)
    study = open_study(settings, sweep_dir, epochs)
    summaries = {t.number: _summary(t) for t in study.get_trials(deepcopy=False)}
    rows = _trial_rows(study, summaries)
    _write_csv(sweep_dir / "search_trials.csv", rows)
    findings = Findings()
    best = _best(study)
    importances = _importances(study, findings)
    findings.notes += _figures(study, sweep_dir, importances is not None, settings.metric)
    spent = sum(r["epochs"] or 0 for r in rows)
    lines = [f"search in {Path(sweep_dir).name}: {_counts(rows)}; {spent} epochs trained of the {len(rows) * epochs} "
             f"that {len(rows)} full runs take"]
    if best is not None:
        summary = summaries.get(best.number)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        lines.append(f"best trial {best.number}: {settings.metric} {best.value:.4f} ({params})")
        lines.append(f"reproduce it: {reproduce_command(summary.overrides if summary else [])}")
    else:
        lines.append("no trial has completed yet, so there is no best trial")
    findings.lines = lines
    _write_markdown(sweep_dir / "search_summary.md", study, settings, rows, lines, importances)
    return findings


def print_search_findings(sweep_dir: Path, sweeper: Mapping[str, Any], epochs: int) -> None:
    """Write the search's report and print what it found, the best trial's command last; a problem with
    it is printed, never raised: as for the sweep report, it must not cost the sweep its exit status."""
    findings = unless_it_fails("search report", lambda: write_search_report(sweep_dir, sweeper, epochs))
    if findings is None:
        return
    for note in findings.notes:
        print(f"note: {note}")
    print(f"search report: {(sweep_dir / 'search_summary.md').resolve()}")
    for line in findings.lines:
        print(line)


def reproduce_command(overrides: list[str]) -> str:
    """The one-run command with a trial's own overrides (the search's settings left out)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra/sweeper", "hydra.sweeper", "hydra/launcher",
                                                                    "hydra.launcher", "hydra.sweep"))]
    return " ".join(["python -m cnnlab", *map(shlex.quote, kept)])


def _trial_rows(study: Any, summaries: dict[int, Any]) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        summary = summaries.get(trial.number)
        rows.append({"trial": trial.number, "state": trial.state.name.lower(),
                     "status": summary.status if summary else trial.user_attrs.get("status", ""),
                     "value": trial.value, "epochs": summary.epochs_completed if summary else None,
                     **{f"param {k}": v for k, v in trial.params.items()},
                     "run": Path(trial.user_attrs.get("run_dir", "")).name})
    return rows


def _summary(trial: Any) -> Any:
    run_dir = trial.user_attrs.get("run_dir")
    try:
        return read_summary(Path(run_dir)) if run_dir else None
    except (OSError, ValueError, TypeError):
        return None


def _best(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:  # no completed trial
        return None


def _counts(rows: list[dict[str, Any]]) -> str:
    states = [r["state"] for r in rows]
    parts = [f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if states.count(s)]
    return f"{len(rows)} trials ({', '.join(parts) or 'none'})"


def _importances(study: Any, findings: Findings) -> dict[str, float] | None:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < MIN_FOR_IMPORTANCE:
        findings.notes.append(f"parameter importances need {MIN_FOR_IMPORTANCE} completed trials; "
                              f"this search has {len(done)}")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError) as err:
        findings.notes.append(f"parameter importances not computed: {err}")
        return None


def _figures(study: Any, sweep_dir: Path, with_importances: bool, metric: str) -> list[str]:
    """Optuna's matplotlib figures; a figure that cannot be drawn yet is a note, not a failure."""
    from optuna.visualization import matplotlib as views

    import optuna

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    figures: dict[str, Callable[[Any], Any]] = {"search_history.png": views.plot_optimization_history}
    if with_importances:
        figures["search_importances.png"] = views.plot_param_importances
    if done >= 2:
        figures["search_parallel.png"] = views.plot_parallel_coordinate
        figures["search_slice.png"] = views.plot_slice
    notes = [] if done >= 2 else ["parallel-coordinate and slice plots need 2 completed trials"]
    for name, plot in figures.items():
        try:
            _save(plot, study, sweep_dir / name, metric)
        except (ValueError, RuntimeError) as err:
            notes.append(f"{name} not drawn: {err}")
    return notes


def _save(plot: Callable[..., Any], study: Any, path: Path, metric: str) -> None:
    import matplotlib
    import matplotlib.pyplot as plt  # Optuna draws with pyplot; each figure is closed once saved

    # Optuna sets its own style globally (plt.style.use): kept inside rc_context, so a notebook's
    # later figures look as the user made them look
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        axes = plot(study, target_name=metric)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        try:
            first.figure.savefig(path, dpi=110, bbox_inches="tight")
        finally:
            plt.close(first.figure)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _write_markdown(path: Path, study: Any, settings: SearchSettings, rows: list[dict[str, Any]], lines: list[str],
                    importances: dict[str, float] | None) -> None:
    direction = "maximized" if settings.maximize else "minimized"
    text = [f"# Search: {path.parent.name} (study {study.study_name})", "",
            f"{settings.metric} {direction}; sampler {settings.sampler} (seed {settings.seed}), pruner {settings.pruner}, "
            f"n_trials={settings.n_trials}.", "", *[f"- {line}" for line in lines], ""]
    if importances:
        text += ["## Parameter importances", "", "| parameter | importance |", "|---|---|"]
        text += [f"| {k} | {v:.3f} |" for k, v in importances.items()] + [""]
    text += ["## Trials", ""]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    text += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    figures = [p for p in ("search_history.png", "search_importances.png", "search_parallel.png", "search_slice.png")
               if (path.parent / p).is_file()]
    text += [""] + [f"![{p}]({p})" for p in figures]
    path.write_text("\n".join(text) + "\n")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
