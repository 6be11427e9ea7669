"""The comparison report: hand-made run directories with known answers, the CLI, and a real multirun."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnlab.checks import ConfigError
from cnnlab.report import METRIC_COLUMNS
from cnnlab.report.compare import resolve_facet, write_report
from cnnlab.report.sweep import find_runs, load_runs, varied_keys
from cnnlab.report.sweep_plots import curves_figure
from conftest import run_cnnlab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(sweep: Path, name: str, *, lr: float, activation: str, status: str = "completed",
             epochs: list[dict] | None = None, seed: int = 0, **summary) -> Path:
    """A run directory as fit() writes it: summary.json with the resolved config, metrics.csv."""
    run = sweep / name
    run.mkdir(parents=True)
    config = {"model": {"name": "lenet", "activation": activation, "dropout": 0.0},
              "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
              "dataset": {"name": "synthetic", "root": f"/data/{name}"},  # roots differ but never count as varied
              "trainer": {"epochs": 4, "seed": seed}}
    overrides = [f"optimizer.lr={lr}", f"model.activation={activation}"]
    base = {"status": status, "overrides": overrides, "params_total": 21686, "train_seconds": 1.5}
    if status != "failed":
        base["config"] = config
    if epochs:
        pd.DataFrame([{**{c: "" for c in METRIC_COLUMNS}, **row} for row in epochs]).to_csv(run / "metrics.csv", index=False)
        base["epochs_completed"] = len(epochs)
    (run / "summary.json").write_text(json.dumps({**base, **summary}))
    return run


def curve(train_loss, train_acc, val_loss, val_acc) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va}
            for i, (tl, ta, vl, va) in enumerate(zip(train_loss, train_acc, val_loss, val_acc))]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Five jobs: three completed (one overfits), one diverged, one failed before training."""
    root = tmp_path / "sweep"
    make_run(root, "0_lr=0.1,relu", lr=0.1, activation="relu", best_epoch=3, best_val_acc=0.65,
             test_acc=0.64, test_loss=0.95,
             epochs=curve([1.6, 1.0, 0.7, 0.4], [0.5, 0.7, 0.8, 0.9], [1.5, 1.0, 0.9, 1.1], [0.45, 0.6, 0.65, 0.62]))
    make_run(root, "1_lr=0.01,relu", lr=0.01, activation="relu", best_epoch=4, best_val_acc=0.55,
             test_acc=0.55, test_loss=1.2,
             epochs=curve([2.0, 1.7, 1.5, 1.3], [0.3, 0.4, 0.5, 0.56], [1.9, 1.6, 1.4, 1.25], [0.3, 0.4, 0.5, 0.55]))
    make_run(root, "2_lr=0.1,tanh", lr=0.1, activation="tanh", best_epoch=4, best_val_acc=0.68,
             test_acc=0.70, test_loss=0.8,
             epochs=curve([1.5, 1.0, 0.8, 0.7], [0.5, 0.6, 0.7, 0.75], [1.2, 1.0, 0.85, 0.8], [0.5, 0.6, 0.66, 0.68]))
    make_run(root, "3_lr=1.0,tanh", lr=1.0, activation="tanh", status="diverged", diverged_epoch=2,
             epochs=curve([2.5, float("nan")], [0.1, 0.1], [2.4, float("nan")], [0.1, 0.1]))
    make_run(root, "4_lr=0.001,tanh", lr=0.001, activation="tanh", status="failed", error="RuntimeError: boom")
    return root


def test_ranking_gap_and_overfitting_markers(sweep: Path) -> None:
    report = write_report([sweep], sweep)
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert report.keys == ["optimizer.lr", "model.activation"]  # dataset.root differs but is a path, not a parameter
    assert list(table["run"]) == ["2_lr=0.1,tanh", "0_lr=0.1,relu", "1_lr=0.01,relu", "3_lr=1.0,tanh", "4_lr=0.001,tanh"]
    assert list(table["mark"].fillna("")) == ["best", "", "worst", "", ""]
    assert list(table["rank"].iloc[:3]) == [1, 2, 3] and table["rank"].iloc[3:].isna().all()
    assert list(table["status"]) == ["completed", "completed", "completed", "diverged", "failed"]
    by_run = table.set_index("run")
    # gap = train_acc - val_acc at the best epoch
    assert by_run.loc["0_lr=0.1,relu", "gap"] == pytest.approx(0.80 - 0.65)
    assert by_run.loc["1_lr=0.01,relu", "gap"] == pytest.approx(0.56 - 0.55)
    assert by_run.loc["2_lr=0.1,tanh", "gap"] == pytest.approx(0.75 - 0.68)
    # run 0: val loss lowest at epoch 3 (0.9), then 1.1 while train loss kept falling
    assert by_run.loc["0_lr=0.1,relu", "min_val_loss_epoch"] == 3
    assert by_run.loc["0_lr=0.1,relu", "val_loss_rise"] == pytest.approx(0.2)
    assert list(table.loc[table["overfit"], "run"]) == ["0_lr=0.1,relu"]
    # final losses come from the summary or, for a run that stopped, its last metrics row
    assert math.isnan(by_run.loc["3_lr=1.0,tanh", "final_train_loss"])
    # the failed run knows its parameters only from its overrides, typed as Hydra typed them
    assert by_run.loc["4_lr=0.001,tanh", "optimizer.lr"] == pytest.approx(0.001)
    assert by_run.loc["4_lr=0.001,tanh", "error"] == "RuntimeError: boom"

    markdown = (sweep / "sweep_summary.md").read_text()
    assert "5 runs from" in markdown and "3 completed, 1 diverged, 1 failed" in markdown
    assert "**Best:** lr=0.1, activation=tanh (job 2): test_acc 0.7" in markdown
    assert "**Worst:** lr=0.01, activation=relu (job 1)" in markdown
    assert "lr=0.1, activation=relu (job 0): lowest val loss 0.9 at epoch 3 of 4, then +0.2" in markdown
    assert "**failed** lr=0.001, activation=tanh (job 4): RuntimeError: boom" in markdown
    assert "**diverged** lr=1, activation=tanh (job 3)" in markdown
    for image in ("sweep_curves.png", "sweep_test_acc.png"):
        assert f"![{image}]({image})" in markdown
        assert (sweep / image).read_bytes()[:8] == PNG_MAGIC
    assert not (sweep / "sweep_confusion.png").exists()  # no run here wrote a confusion matrix

    stacked = pd.read_csv(sweep / "sweep_metrics.csv")
    assert stacked.groupby("run").size().to_dict() == {"0_lr=0.1,relu": 4, "1_lr=0.01,relu": 4, "2_lr=0.1,tanh": 4, "3_lr=1.0,tanh": 2}
    assert list(stacked.columns[:4]) == ["run", "status", "optimizer.lr", "model.activation"]


def test_lower_is_better_metrics_rank_ascending(sweep: Path, tmp_path: Path) -> None:
    write_report([sweep], tmp_path / "by_loss", metric="test_loss")
    table = pd.read_csv(tmp_path / "by_loss" / "sweep_summary.csv")
    assert list(table["test_loss"].iloc[:3]) == [0.8, 0.95, 1.2]
    assert "ranked by **test_loss** (lower is better)" in (tmp_path / "by_loss" / "sweep_summary.md").read_text()
    with pytest.raises(ConfigError, match="report.metric.*test_acc"):
        write_report([sweep], tmp_path / "bad", metric="accuracy")


def test_curves_have_one_line_set_per_run_and_a_row_per_facet(sweep: Path) -> None:
    runs = load_runs(find_runs([sweep]))
    keys = varied_keys(runs)
    fig = curves_figure(runs, keys, facet=["model.activation"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["activation=relu: loss", "activation=relu: accuracy",
                                               "activation=tanh: loss", "activation=tanh: accuracy"]
    drawn = {line.get_gid() for ax in axes for line in ax.get_lines() if line.get_gid()}
    assert drawn == {"0_lr=0.1,relu", "1_lr=0.01,relu", "2_lr=0.1,tanh", "3_lr=1.0,tanh"}  # every run with metrics
    # the overfitting marker sits on run 0's lowest val loss
    markers = [line for line in axes[0].get_lines() if line.get_marker() == "v"]
    assert len(markers) == 1 and list(markers[0].get_xydata()[0]) == [3, 0.9]
    # colours follow the line label (the lr), the same in every row
    legend = {t.get_text() for t in axes[3].get_legend().get_texts()}
    assert legend == {"lr=0.1", "lr=1", "lr=0.001"} - {"lr=0.001"}  # the failed run has no curve


def test_facet_names_resolve_and_typos_fail(sweep: Path) -> None:
    runs = load_runs(find_runs([sweep]))
    keys = varied_keys(runs)
    assert resolve_facet(["activation", "lr"], keys, runs) == (["model.activation", "optimizer.lr"], [])
    facet, notes = resolve_facet(["model"], keys, runs)  # exists but did not vary: dropped with a note
    assert facet == [] and "model.name had a single value" in notes[0]
    with pytest.raises(ConfigError, match="no run has a key 'activaton'.*optimizer.lr, model.activation"):
        resolve_facet(["activaton"], keys, runs)


def test_seed_means(tmp_path: Path) -> None:
    root = tmp_path / "seeds"
    accs = {("relu", 0): 0.60, ("relu", 1): 0.64, ("tanh", 0): 0.70, ("tanh", 1): 0.74}
    for i, ((act, seed), acc) in enumerate(accs.items()):
        make_run(root, f"{i}_run", lr=0.1, activation=act, seed=seed, test_acc=acc, best_val_acc=acc, best_epoch=1,
                 epochs=curve([1.0], [acc], [1.0], [acc]))
    report = write_report([root], root)
    assert report.keys == ["model.activation", "trainer.seed"]
    seeds = pd.read_csv(root / "sweep_seeds.csv")
    assert list(seeds["model.activation"]) == ["tanh", "relu"]
    assert list(seeds["seeds"]) == [2, 2]
    assert seeds["test_acc_mean"].tolist() == pytest.approx([0.72, 0.62])
    assert seeds["test_acc_std"].tolist() == pytest.approx([0.02828427, 0.02828427])
    assert "| tanh         |       2 | 0.72 ± 0.02828" in (root / "sweep_summary.md").read_text()


def test_cli_compares_any_set_of_run_directories(sweep: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    make_run(other, "solo", lr=0.05, activation="relu", best_epoch=1, best_val_acc=0.9, test_acc=0.91, test_loss=0.3,
             epochs=curve([0.5], [0.9], [0.4], [0.9]))
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "cnnlab.report", str(sweep / "0_lr=0.1,relu"), str(other / "solo"),
                           "--out", str(out), "--metric", "best_val_acc"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 runs compared; varied: optimizer.lr" in done.stdout
    table = pd.read_csv(out / "sweep_summary.csv")
    assert list(table["run"]) == ["elsewhere/solo", "sweep/0_lr=0.1,relu"]  # named relative to their common parent
    assert "ranked by **best_val_acc**" in (out / "sweep_summary.md").read_text()


@pytest.mark.parametrize("make_source, message", [
    (lambda tmp: tmp / "missing", "is not a directory"),
    (lambda tmp: tmp, "holds no run directories"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path: Path, make_source, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cnnlab", "report", str(make_source(tmp_path))],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_multirun_reports_every_job_including_a_failed_one(tmp_path: Path) -> None:
    """Four real jobs; the two on MNIST fail at run time (its files are not where dataset.root says),
    the two on synthetic data train. (A job whose config is wrong is refused before the sweep starts.)"""
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "model.kernel_size=3,5", "dataset=synthetic,mnist", f"dataset.root={tmp_path / 'none'}",
                      "dataset.download=false", "dataset.subset=256", "trainer.epochs=2", "trainer.batch_size=32",
                      "trainer.device=cpu", "trainer.progress=false", "report.facet=[kernel_size]",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr  # a failed job fails the sweep, after the report
    assert f"report: {sweep / 'sweep_summary.md'}" in done.stdout

    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(table) == 4
    assert set(table.columns[2:6]) >= {"model.kernel_size", "dataset.name"}
    failed = table[table["status"] == "failed"]
    assert len(failed) == 2 and set(failed["dataset.name"]) == {"mnist"}
    assert all("idx files were not found" in error for error in failed["error"])
    completed = table[table["status"] == "completed"]
    assert len(completed) == 2 and set(completed["dataset.name"]) == {"synthetic"}
    for _, row in completed.iterrows():  # the table holds what each job wrote
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert row["test_acc"] == pytest.approx(summary["test_acc"])
        assert row["params"] == summary["params_total"]
    assert list(completed["test_acc"]) == sorted(completed["test_acc"], reverse=True)

    stacked = pd.read_csv(sweep / "sweep_metrics.csv")
    assert set(stacked["run"]) == set(completed["run"])  # one set of curves per completed run
    assert (stacked.groupby("run").size() == 2).all()  # 2 epochs each
    runs = load_runs(find_runs([sweep]))
    fig = curves_figure(runs, varied_keys(runs), facet=["model.kernel_size"])
    assert {line.get_gid() for ax in fig.axes for line in ax.get_lines() if line.get_gid()} == set(completed["run"])
    for image in ("sweep_curves.png", "sweep_test_acc.png", "sweep_confusion.png"):
        assert (sweep / image).read_bytes()[:8] == PNG_MAGIC
    markdown = (sweep / "sweep_summary.md").read_text()
    assert "4 runs from" in markdown and "2 completed, 2 failed" in markdown
    assert "**failed** kernel_size=5, dataset=mnist" in markdown

def test_stuck_runs_are_a_column_and_a_section(tmp_path: Path) -> None:
    """A run the doctor last found stuck may say completed; the report says it did not learn."""
    root = tmp_path / "sweep"
    make_run(root, "0_lr-0.1", lr=0.1, activation="relu", test_acc=0.1, best_epoch=1, best_val_acc=0.1,
             diagnosis={"stuck": True, "cause": "vgg11 (no batch norm): it gives every image the same output"})
    make_run(root, "1_lr-0.01", lr=0.01, activation="relu", test_acc=0.6, best_epoch=1, best_val_acc=0.6,
             diagnosis=None)
    report = write_report([root], root)
    table = pd.read_csv(root / "sweep_summary.csv").set_index("run")
    assert bool(table.loc["0_lr-0.1", "stuck"]) and not bool(table.loc["1_lr-0.01", "stuck"])
    markdown = (root / "sweep_summary.md").read_text()
    assert "## Stuck runs" in markdown
    assert "- **completed** lr=0.1 (job 0): vgg11 (no batch norm): it gives every image the same output" in markdown
    assert "| stuck   |" in markdown.split("## ")[0]  # the ranked table has the column, before the sections
    assert len(report.table) == 2


# ------------------------------------------------------------------------------- figures side by side


def _two_runs(tmp_path: Path) -> list[Path]:
    runs = [make_run(tmp_path / "runs", f"{i}", lr=0.1, activation="relu",
                     epochs=curve([1.6, 1.0], [0.5, 0.7], [1.5, 1.0], [0.45, 0.6])) for i in range(2)]
    return runs


def _draw_run(draw, run: Path) -> None:
    import numpy as np
    from cnnlab.report import plot_curves, write_confusion

    draw(write_confusion, run, np.arange(9).reshape(3, 3), ["a", "b", "c"])
    draw(plot_curves, run, "title", False, 2)


def test_runs_that_end_together_draw_side_by_side_the_files_they_draw_alone(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused group's members that end together send their figures to child processes: the same bytes as drawn
    at once; one run's failed figure is that run's error alone; each is finished only once its files are there."""
    import os

    from cnnlab.report import drawing, plot_curves

    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # children even on a 1-core runner
    alone, together = _two_runs(tmp_path / "alone"), _two_runs(tmp_path / "together")
    for run in alone:
        _draw_run(drawing.Drawing(), run)
    finished = []
    with drawing.side_by_side(5) as drawings:
        draws = [drawings() for _ in range(3)]
        assert all(d.batch is not None for d in draws) and draws[0].batch.children == 4
        for draw, run in zip(draws, together):
            _draw_run(draw, run)
            draw.after(lambda run=run: finished.append((run, sorted(p.name for p in run.glob("*.png")))))
        draws[2](plot_curves, tmp_path / "nowhere", "title", False, None)  # no metrics.csv there
        draws[2].after(finished.append, "never")
        assert finished == []  # nothing is drawn before the first wait
        for draw in draws[:2]:
            draw.wait()
        with pytest.raises(FileNotFoundError, match="nowhere"):
            draws[2].wait()
        outcomes = draws[0].batch.outcomes
        assert outcomes[:4] == [None] * 4 and isinstance(outcomes[4], FileNotFoundError)  # drawn by the children
    assert finished == [(run, ["confusion_matrix.png", "curves.png"]) for run in together]
    for a, b in zip(alone, together):
        for name in ("confusion_matrix.png", "curves.png", "confusion_matrix.csv", "per_class_accuracy.csv"):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_figures_a_child_could_not_draw_are_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cnnlab.report import drawing

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(drawing, "CHILD", "import sys; sys.exit(3)")  # a child that dies at once
    runs = _two_runs(tmp_path)
    with drawing.side_by_side(4) as drawings:
        draws = [drawings() for _ in runs]
        for draw, run in zip(draws, runs):
            _draw_run(draw, run)
        for draw in draws:
            draw.wait()
    assert all((run / name).read_bytes().startswith(PNG_MAGIC) for run in runs for name in ("confusion_matrix.png", "curves.png"))
    with drawing.side_by_side(2) as drawings:  # one run's two figures: drawn at once, no child
        assert drawings().batch is None
