"""End to end through the CLI: every file of the run directory, read and checked."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnnlab.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.report import METRIC_COLUMNS
from cnnlab.build import prepare

from conftest import FASHION_MNIST_SYSTEM_DIR, compose_config, run_cnnlab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_run_dir(run_dir: Path, epochs: int, test_size: int, classes: list[str] | None = None) -> dict:
    """Assert the whole run-directory contract; returns summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert tuple(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == list(range(1, epochs + 1))
    for column in ("train_loss", "val_loss", "lr", "epoch_seconds", "images_per_second"):
        assert np.isfinite(metrics[column]).all() and (metrics[column] > 0).all(), column
    for column in ("train_acc", "val_acc"):
        assert metrics[column].between(0, 1).all(), column

    # summary agrees with metrics.csv: the best val accuracy, and of epochs tied on it the lowest val loss
    tied = metrics[metrics["val_acc"] == metrics["val_acc"].max()]
    best_row = tied.loc[tied["val_loss"].idxmin()]
    assert summary["best_epoch"] == int(best_row["epoch"])
    assert summary["best_val_acc"] == pytest.approx(best_row["val_acc"])
    assert summary["epochs_completed"] == epochs
    assert summary["final_train_loss"] == pytest.approx(metrics["train_loss"].iloc[-1])
    assert summary["final_val_acc"] == pytest.approx(metrics["val_acc"].iloc[-1])
    assert summary["train_seconds"] <= metrics["epoch_seconds"].sum() + 1e-3  # rounded to ms and to 0.1 ms
    assert summary["test_size"] == test_size
    assert summary["params_total"] >= summary["params_trainable"] > 0
    assert summary["model_size_mb"] == pytest.approx(summary["params_total"] * 4 / 1e6, rel=0.05)
    for key in ("test_loss", "test_acc", "device", "model", "dataset", "overrides"):
        assert key in summary, key

    # the model card: layer table file and the same numbers in summary.json
    card = (run_dir / "model_summary.txt").read_text()
    assert f"Total params: {summary['params_total']:,}" in card
    assert f"{summary['params_total']:,} total, {summary['params_trainable']:,} trainable" in card
    assert summary["flops_per_image"] == 2 * summary["macs_per_image"] > 0
    assert summary["input_shape"] == [int(v) for v in card.splitlines()[0].split("input: ")[1].split()[0].split("x")]

    # confusion matrix: the test set, class names on both axes
    confusion = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0)
    assert confusion.shape == (summary["num_classes"], summary["num_classes"])
    assert list(confusion.index) == list(confusion.columns)
    if classes is not None:
        assert list(confusion.index) == classes
    assert int(confusion.to_numpy().sum()) == test_size
    assert np.trace(confusion.to_numpy()) / test_size == pytest.approx(summary["test_acc"])

    per_class = pd.read_csv(run_dir / "per_class_accuracy.csv")
    assert list(per_class.columns) == ["class", "correct", "total", "accuracy"]
    assert per_class["total"].sum() == test_size
    assert per_class["correct"].tolist() == np.diag(confusion.to_numpy()).tolist()

    for png in ("curves.png", "confusion_matrix.png"):
        data = (run_dir / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png

    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert last["epoch"] == epochs and best["epoch"] == summary["best_epoch"]
    for key in ("model", "optimizer", "scheduler", "rng", "config", "step"):
        assert key in last, key

    log_text = (run_dir / "train.log").read_text()
    assert f"epoch {epochs}/{epochs}" in log_text and "test" in log_text
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    return summary


def test_smoke_run_writes_a_complete_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cnnlab("+debug=smoke", "trainer.epochs=4", "optimizer.lr=0.05", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=4, test_size=128)
    assert str(run_dir.resolve()) in result.stdout + result.stderr  # the console says where the results are
    # the synthetic classes are learnable: far above the 10% of chance
    assert summary["test_acc"] > 0.5

    # the checkpoint rebuilds the same model and reproduces the reported test loss
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    run = validate(compose_config("+debug=smoke", "trainer.epochs=4", "optimizer.lr=0.05"))
    model = prepare(run).model
    model.load_state_dict(ckpt["model"])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == summary["params_total"]


def test_channels_last_and_bf16_request_run_on_cpu(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cnnlab("+debug=smoke", "model=resnet18", "trainer.channels_last=true", "trainer.precision=bf16",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=2, test_size=128)
    assert summary["precision"] == "fp32"  # bf16 autocast is CUDA-only, and the log says so
    assert "bf16 applies on CUDA only" in (run_dir / "train.log").read_text()


def test_sweep_gives_every_job_a_complete_run_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "+debug=smoke", "optimizer.lr=0.05,0.01", "model.activation=relu,tanh",
                        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert len(job_dirs) == 4
    combos = set()
    for job_dir in job_dirs:
        summary = check_run_dir(job_dir, epochs=2, test_size=128)
        combos.add(tuple(sorted(o for o in summary["overrides"] if not o.startswith("+debug"))))
        assert summary["config"]["optimizer"]["lr"] in (0.05, 0.01)
    assert combos == {
        ("model.activation=" + a, "optimizer.lr=" + lr) for a in ("relu", "tanh") for lr in ("0.05", "0.01")
    }


def test_runtime_failure_is_recorded_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "run"
    # a missing dataset with download disabled fails after validation, at data loading
    result = run_cnnlab("dataset=cifar10", f"dataset.root={tmp_path / 'nothing'}", "dataset.download=false",
                        "trainer.device=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "cifar-10-batches-py" in output and "Traceback" not in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "cifar-10-batches-py" in summary["error"]


def test_lenet_on_real_fashion_mnist_reaches_85_percent_in_one_epoch(tmp_path, empty_data_root):
    assert (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(), (
        "apt-get install -y dataset-fashion-mnist (done by .ci/run)")
    run_dir = tmp_path / "run"
    # the default experiment, with dataset.root at its default (an empty home here), so the system copy is used
    result = run_cnnlab("trainer.epochs=1", "trainer.device=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                        env={"HOME": str(empty_data_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=1, test_size=10000,
                            classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])
    assert summary["train_size"] == 54000 and summary["val_size"] == 6000
    assert summary["test_acc"] >= 0.85
    assert math.isfinite(summary["test_loss"])
    assert summary["diagnosis"] is None and "doctor:" not in (run_dir / "train.log").read_text()  # no false alarm


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_vgg11_on_cifar10_files_in_the_real_format(tmp_path):
    from test_data import write_cifar10

    root = tmp_path / "data"
    write_cifar10(root, per_batch=40, n_test=50, meta_names=CIFAR10_NAMES)
    run_dir = tmp_path / "run"
    result = run_cnnlab("model=vgg11", "dataset=cifar10", f"dataset.root={root}", "dataset.download=false",
                        "augmentation=cifar", "model.classifier_width=64", "trainer.epochs=2",
                        "trainer.batch_size=32", "trainer.device=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=2, test_size=50, classes=CIFAR10_NAMES)
    assert summary["train_size"] + summary["val_size"] == 200
    assert summary["input_shape"] == [3, 32, 32]


def test_resnet18_on_cifar100_files_in_the_real_format(tmp_path):
    from test_data import CIFAR100_CLASSES, write_cifar100

    root = tmp_path / "data"
    write_cifar100(root, n_train=200, n_test=100)
    run_dir = tmp_path / "run"
    result = run_cnnlab("model=resnet18", "dataset=cifar100", f"dataset.root={root}", "dataset.download=false",
                        "dataset.val_split=20", "trainer.epochs=1", "trainer.batch_size=32", "trainer.device=cpu",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=1, test_size=100, classes=list(CIFAR100_CLASSES))
    assert (summary["train_size"], summary["val_size"], summary["num_classes"]) == (180, 20, 100)


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    """A job that fails at run time (its dataset's files are missing) is recorded; the others run.
    (A job whose config is wrong stops the sweep before any job starts: tests/test_precheck.py.)"""
    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "dataset=synthetic,cifar10,mnist", f"dataset.root={tmp_path / 'nothing'}",
                        "dataset.download=false", "dataset.subset=200", "trainer.epochs=1", "trainer.device=cpu",
                        "trainer.progress=false", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode != 0  # the sweep reports the failure at the end
    statuses = {}
    for path in sweep_dir.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        statuses[summary["overrides"][0]] = summary["status"]
        if summary["status"] == "completed":
            check_run_dir(path.parent, epochs=1, test_size=200)
        else:
            assert "were not found" in summary["error"] or "does not exist" in summary["error"], summary["error"]
    assert statuses == {"dataset=synthetic": "completed", "dataset=cifar10": "failed", "dataset=mnist": "failed"}


def test_installed_package_runs_from_any_directory(tmp_path):
    """pip install . (not editable) ships conf/ inside the package; run from an unrelated directory."""
    import os
    import subprocess
    import sys

    import shutil

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # build from a copy: setuptools leaves build/ in the tree it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    for name in ("cnnlab", "conf", "hydra_plugins"):
        shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "cnnlab" / "conf" / "config.yaml").is_file()
    assert (target / "cnnlab" / "conf" / "model" / "vgg11.yaml").is_file()
    # the Optuna sweeper sits where Hydra's plugin scan looks, so a regular install needs no registering
    scan = subprocess.run([sys.executable, "-c", "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper "
                           "import Sweeper; print([c.__module__ for c in Plugins.instance().discover(Sweeper)])"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert "hydra_plugins.cnnlab_search.optuna_sweeper" in scan.stdout, scan.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = elsewhere / "run"
    # the `cnnlab` console script, as pip installed it
    result = subprocess.run([str(target / "bin" / "cnnlab"), "+debug=smoke", "trainer.epochs=1", f"hydra.run.dir={run_dir}"],
                            cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    hydra_cfg = (run_dir / ".hydra" / "hydra.yaml").read_text()
    assert str(target / "cnnlab" / "conf") in hydra_cfg  # the configs came from the installed copy


@pytest.mark.parametrize("mode,key", [([], "hydra.run.dir"), (["-m"], "hydra.sweep.dir")])
def test_unwritable_output_directory_is_one_clear_message(tmp_path, mode, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cnnlab(*mode, "+debug=smoke", f"{key}={blocker / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert key in output and "is a file, not a directory" in output
    assert "Traceback" not in output
