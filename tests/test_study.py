"""What homework studies ask of a run: the best epoch when validation accuracy ties, the front door
(--help lists the subcommands, --version is cnnlab's)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cnnlab


def test_a_tie_in_val_accuracy_goes_to_the_lower_val_loss(tmp_path: Path) -> None:
    """8 validation images reach 100% in a few epochs and tie ever after: the best epoch is the tied one with
    the lowest validation loss, not the first that got there."""
    result = run_cnnlab("+debug=smoke", "dataset.noise=0.05", "dataset.val_split=8", "trainer.epochs=6",
                        "scheduler=none", "optimizer.lr=0.05", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    tied = metrics[metrics["val_acc"] == metrics["val_acc"].max()]
    assert len(tied) >= 2  # the situation this is about
    expected = int(tied.loc[tied["val_loss"].idxmin(), "epoch"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_epoch"] == expected != int(tied["epoch"].iloc[0])
    assert f"test (epoch {expected} weights)" in (tmp_path / "run" / "train.log").read_text()


def test_help_lists_the_subcommands_before_hydras_text(tmp_path: Path) -> None:
    result = run_cnnlab("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = result.stdout
    for sub in ("cnnlab models", "cnnlab report", "cnnlab evaluate", "cnnlab predict", "cnnlab --version"):
        assert sub in text, sub
    assert text.index("cnnlab evaluate") < text.index("Configuration groups")  # then Hydra's help


def test_version_is_cnnlabs(tmp_path: Path) -> None:
    from cnnlab import __version__

    result = run_cnnlab("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"cnnlab {__version__}"


def test_checkpoint_policies_keep_what_they_say_and_score_the_same(tmp_path: Path) -> None:
    base = ("+debug=smoke", "trainer.epochs=4", "scheduler=none", "optimizer.lr=0.3")  # best at epoch 1 of 4
    summaries = {}
    for policy in ("best_and_last", "last", "none"):
        result = run_cnnlab(*base, f"trainer.checkpoints={policy}", f"hydra.run.dir={tmp_path / policy}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        summaries[policy] = json.loads((tmp_path / policy / "summary.json").read_text())
        folder = tmp_path / policy / "checkpoints"
        kept = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        assert kept == {"best_and_last": ["best.pt", "last.pt"], "last": ["last.pt"], "none": []}[policy]
    # the test set is scored with the best epoch's weights whatever is kept on disk
    assert summaries["best_and_last"]["best_epoch"] < 4  # so the last epoch's weights would score otherwise
    for policy in ("last", "none"):
        for key in ("test_acc", "test_loss", "best_epoch", "test_checkpoint"):
            assert summaries[policy][key] == summaries["best_and_last"][key], (policy, key)
    refused = run_cnnlab(*base, "trainer.checkpoints=some", cwd=tmp_path)
    assert refused.returncode == 2 and "trainer.checkpoints='some' is not valid; choose one of: best_and_last, last, none" \
        in refused.stderr


def test_name_names_runs_sweeps_and_report_rows(tmp_path: Path) -> None:
    for _ in range(2):
        result = run_cnnlab("+debug=smoke", "trainer.epochs=1", "name=sigmoid_lr0.1", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    runs = tmp_path / "outputs" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["sigmoid_lr0.1", "sigmoid_lr0.1_2"]  # never shared
    assert json.loads((runs / "sigmoid_lr0.1" / "summary.json").read_text())["config"]["name"] == "sigmoid_lr0.1"

    sweep = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=1", "name=lr_study", "optimizer.lr=0.05,0.01", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    table = pd.read_csv(tmp_path / "outputs" / "sweeps" / "lr_study" / "sweep_summary.csv")
    assert sorted(table["run"]) == ["0_lr-0.05", "1_lr-0.01"]

    report = run_cnnlab("report", str(runs / "sigmoid_lr0.1"), str(runs / "sigmoid_lr0.1_2"), "--out",
                        str(tmp_path / "cmp"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert sorted(pd.read_csv(tmp_path / "cmp" / "sweep_summary.csv")["run"]) == ["sigmoid_lr0.1", "sigmoid_lr0.1_2"]

    bad = run_cnnlab("+debug=smoke", "name=a/b", cwd=tmp_path)
    assert bad.returncode == 2 and "name='a/b' cannot name a directory" in bad.stderr


def test_test_every_epoch_puts_the_test_set_in_every_row_curve_tracker_and_report(tmp_path: Path) -> None:
    from cnnlab.report import METRIC_COLUMNS
    from cnnlab.report.sweep import find_runs, load_runs
    from cnnlab.report.sweep_plots import curves_figure
    from test_trackers import check_tensorboard

    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=3", "trainer.test_every_epoch=true", "viz.curves=error",
                        "logger=tensorboard", "optimizer.lr=0.05,0.02", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file()):
        metrics = pd.read_csv(run_dir / "metrics.csv")
        assert tuple(metrics.columns) == METRIC_COLUMNS + ("test_loss", "test_acc")
        assert metrics["test_acc"].between(0, 1).all() and (metrics["test_loss"] > 0).all()
        summary = json.loads((run_dir / "summary.json").read_text())
        # the headline score is the best-validation epoch's, which that epoch's row also measured
        best = metrics.set_index("epoch").loc[summary["best_epoch"]]
        assert summary["test_acc"] == best["test_acc"] and summary["test_checkpoint"] == "best"
        check_tensorboard(run_dir)  # loss/test and accuracy/test equal the csv columns, epoch by epoch
    figure = curves_figure(load_runs(find_runs([sweep_dir])), ["optimizer.lr"])
    dotted = [line for ax in figure.axes for line in ax.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 4  # test loss and test accuracy of each of the two runs
    assert "test dotted" in figure._suptitle.get_text()


def test_analysis_after_training_feature_maps_per_class_and_the_sweep_table(tmp_path: Path) -> None:
    from PIL import Image

    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "+debug=smoke", "optimizer.lr=0.05,0.02", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = sweep_dir / "0_lr-0.05"
    log = (run_dir / "train.log").read_text()
    per_class = pd.read_csv(run_dir / "per_class_accuracy.csv")
    assert "per-class test accuracy:" in log
    for name, correct, total in zip(per_class["class"], per_class["correct"], per_class["total"]):
        assert re.search(rf"  {name} +\d+\.\d\d%  \({correct}/{total}\)", log), name  # every class, as homework prints it

    table = pd.read_csv(sweep_dir / "sweep_per_class.csv", index_col="class")
    ranked = pd.read_csv(sweep_dir / "sweep_summary.csv")["run"].tolist()
    assert list(table.columns) == ranked and list(table.index) == per_class["class"].tolist()
    assert table["0_lr-0.05"].tolist() == pytest.approx(per_class["accuracy"].tolist())
    assert "## Per-class test accuracy" in (sweep_dir / "sweep_summary.md").read_text()

    out = tmp_path / "maps"
    evaluated = run_cnnlab("evaluate", f"run={run_dir}", "feature_maps=true", "viz.num_images=3", "viz.layer=features.0",
                           f"out={out}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    maps = json.loads((out / "eval_summary.json").read_text())["feature_maps"]
    assert maps["panels"] == 3 and maps["layer"] == "features.0" and len(maps["predicted"]) == 3
    assert Image.open(out / "feature_maps.png").size[0] > 300
    assert "per-class test accuracy:" in evaluated.stdout and "feature maps: 3 images at features.0" in evaluated.stdout
    assert not (run_dir / "feature_maps.png").exists()  # the run's own files are left as they are
    bad = run_cnnlab("evaluate", f"run={run_dir}", "feature_maps=true", "viz.layer=classifier", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a conv layer of this model; choose one of: features.0" in bad.stderr


def test_a_hundred_classes_get_the_most_confused_pairs_instead_of_a_grid(tmp_path: Path) -> None:
    result = run_cnnlab("+debug=smoke", "trainer.epochs=1", "dataset.num_classes=100", "dataset.train_size=1000",
                        "dataset.test_size=300", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    confusion = pd.read_csv(tmp_path / "run" / "confusion_matrix.csv", index_col=0).to_numpy()
    pairs = pd.read_csv(tmp_path / "run" / "confused_pairs.csv")
    off = confusion.sum() - confusion.trace()
    assert pairs["count"].sum() == off and pairs["count"].is_monotonic_decreasing
    assert pairs.iloc[0]["count"] == (confusion - np.diag(np.diag(confusion))).max()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "per-class test accuracy (worst and best 10 of 100):" in log


def _run(name: str, **params):  # a report.sweep.Run
    from cnnlab.record import Summary
    from cnnlab.report.sweep import Run

    return Run(path=Path(name), name=name, summary=Summary(), params=params, override_keys=[], metrics=None)


def test_legend_labels_tell_every_run_apart() -> None:
    from cnnlab.report.sweep import distinct_labels

    runs = [_run("0", **{"optimizer.name": "adam", "optimizer.lr": 0.001, "optimizer.weight_decay": 0}),
            _run("1", **{"optimizer.name": "radam", "optimizer.lr": 0.001, "optimizer.weight_decay": 0}),
            _run("2", **{"optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.weight_decay": 0.0005})]
    labels = distinct_labels(runs, ["optimizer.lr", "optimizer.weight_decay"])
    assert labels == {"0": "lr=0.001, weight_decay=0, optimizer=adam", "1": "lr=0.001, weight_decay=0, optimizer=radam",
                      "2": "lr=0.05, weight_decay=0.0005"}
    same = distinct_labels([_run("a", x=1), _run("b", x=1)], [])  # nothing differs: the directories do
    assert len(set(same.values())) == 2


def test_sweep_report_plots_accuracy_against_each_numeric_key(tmp_path: Path) -> None:
    from cnnlab.report.sweep import find_runs, load_runs, summary_table, varied_keys
    from cnnlab.report.sweep_plots import params_figure

    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=1", "optimizer.lr=0.1,0.01,0.001",
                        "optimizer.weight_decay=0,0.0005", "augmentation=flip,none", f"hydra.sweep.dir={sweep_dir}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "sweep_params.png").stat().st_size > 10_000
    table = pd.read_csv(sweep_dir / "sweep_summary.csv")
    # one change, one column: augmentation.ops follows augmentation.name and gets no column of its own
    assert "augmentation.name" in table and "augmentation.ops" not in table
    for row in table.itertuples():
        epochs = pd.read_csv(Path(row.path) / "metrics.csv")["epoch_seconds"]
        assert row.seconds_per_epoch == pytest.approx(epochs.mean(), abs=1e-4)

    runs = load_runs(find_runs([sweep_dir]))
    keys = varied_keys(runs)
    figure = params_figure(summary_table(runs, "test_acc", keys), keys, "test_acc")
    lr_axis, wd_axis, heat = figure.axes[:3]
    assert lr_axis.get_xscale() == "log" and wd_axis.get_xscale() == "symlog"  # 0 is one of the decays
    assert len(lr_axis.lines) == 4  # one line per (weight decay, augmentation)
    frame = summary_table(runs, "test_acc", keys)
    expected = frame.pivot_table(index="optimizer.lr", columns="optimizer.weight_decay", values="test_acc", aggfunc="mean")
    assert np.asarray(heat.images[0].get_array()) == pytest.approx(expected.to_numpy())


@pytest.mark.parametrize(("line", "expected", "absent"), [
    ("cnnlab mod", ["models", "model="], []),
    ("cnnlab ev", ["evaluate"], []),
    ("cnnlab evaluate ru", ["run="], ["Error"]),
    ("cnnlab evaluate run=x da", ["dataset=", "dataset."], ["Error"]),
    ("cnnlab predict run=x ima", ["images="], ["Error"]),
    ("cnnlab models --ne", ["--near"], ["Error"]),
    ("cnnlab optimizer.l", ["optimizer.lr="], ["evaluate"]),
])
def test_shell_completion_completes_subcommands_without_errors(tmp_path: Path, line: str, expected: list[str],
                                                               absent: list[str]) -> None:
    result = run_cnnlab("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert result.returncode == 0 and not result.stderr, result.stderr
    words = result.stdout.split()
    for word in expected:
        assert word in words, (word, words)
    for word in absent:
        assert word not in result.stdout
