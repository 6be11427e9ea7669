"""Experiment trackers (logger=tensorboard|mlflow): real runs, and what they wrote, read back.

Every run here works in one module-wide directory, so the MLflow store (outputs/mlflow/mlflow.db)
is created once; each test keeps to its own MLflow experiment.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from cnnlab.checks import ConfigError
from cnnlab.config import validate
from cnnlab.record import Summary
from cnnlab.report import METRIC_COLUMNS
from cnnlab.trackers import (
    TB_TAGS, LoggerConfig, MlflowConfig, TensorBoardConfig, Trackers, check_installed, flat_config,
    open_trackers,
)

from conftest import compose_config, run_cnnlab

BOTH = "logger=[tensorboard,mlflow]"
# MLflow's own use of a SQLAlchemy 2.1 deprecation; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # runs go to this test's local store, not the user's server
        yield tmp_path_factory.mktemp("trackers")


def cnnlab(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cnnlab(*args, cwd=workdir, timeout=300)


def store(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'outputs' / 'mlflow' / 'mlflow.db'}")


def mlflow_runs(workdir: Path, experiment: str) -> list[Any]:
    client = store(workdir)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def events(tb_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_info(acc: EventAccumulator) -> tuple[dict[str, Any], int]:
    """(hyperparameters, session status) as TensorBoard's HParams tab reads them."""
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, end.status


def check_tensorboard(run_dir: Path) -> None:
    """Scalars equal metrics.csv per epoch, once each; hparams, final metrics and the confusion image are there."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = events(run_dir / "tensorboard")
    for column, tag in TB_TAGS.items():
        if column not in metrics:  # test_loss/test_acc: only with trainer.test_every_epoch
            continue
        points = acc.Scalars(tag)
        assert [p.step for p in points] == metrics["epoch"].tolist(), tag  # every epoch, none twice
        assert [p.value for p in points] == pytest.approx(metrics[column].tolist(), rel=1e-6), tag
    for key in ("test_acc", "test_loss", "best_val_acc", "epochs_completed"):
        (point,) = acc.Scalars(f"final/{key}")
        assert point.value == pytest.approx(summary[key], rel=1e-6), key
    (image,) = acc.Images("confusion_matrix")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100
    hparams, status = hparams_info(acc)
    config = summary["config"]
    assert hparams["optimizer.lr"] == pytest.approx(config["optimizer"]["lr"])
    assert hparams["model.name"] == config["model"]["name"]
    assert hparams["trainer.epochs"] == config["trainer"]["epochs"]
    assert hparams["trainer.channels_last"] is config["trainer"]["channels_last"]  # a bool stays a bool
    assert not any(k.startswith("logger") for k in hparams)
    assert status == api_pb2.Status.Value("STATUS_SUCCESS")
    assert "model_summary/text_summary" in acc.Tags()["tensors"]


def check_mlflow(run: Any, run_dir: Path, workdir: Path) -> None:
    """Params are the config, metric history is metrics.csv, final metrics are summary.json's, artifacts are there."""
    client = store(workdir)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cnnlab.status"] == "completed"
    assert run.info.run_name == run_dir.name
    assert run.data.tags["cnnlab.run_dir"] == str(run_dir.resolve())
    assert summary["trackers"]["mlflow_run_id"] == run.info.run_id

    params, config = run.data.params, summary["config"]
    assert params["optimizer.lr"] == str(config["optimizer"]["lr"])
    assert params["model.name"] == config["model"]["name"] == "lenet"
    assert params["dataset.train_size"] == str(config["dataset"]["train_size"])
    assert params["augmentation.ops"] == json.dumps(config["augmentation"]["ops"])
    assert params["trainer.grad_clip"] == "None"
    expected = flat_config(validate(compose_config("+debug=smoke")).to_dict())  # the same keys as any smoke run
    assert set(params) == set(expected)

    for column in METRIC_COLUMNS[1:]:
        history = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == metrics["epoch"].tolist(), column
        assert [m.value for m in history] == pytest.approx(metrics[column].tolist()), column
    final = run.data.metrics
    assert final["test_acc"] == pytest.approx(summary["test_acc"])
    assert final["test_loss"] == pytest.approx(summary["test_loss"])
    assert final["best_val_acc"] == pytest.approx(summary["best_val_acc"])
    assert final["epochs_completed"] == summary["epochs_completed"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "curves.png", "confusion_matrix.png", "confusion_matrix.csv",
            "per_class_accuracy.csv", "model_summary.txt", "train.log", "hydra"} <= artifacts
    download = workdir / "downloads" / run.info.run_id
    download.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(download)))
    assert json.loads(local.read_text())["test_acc"] == summary["test_acc"]


@pytest.fixture(scope="module")
def tracked(workdir: Path) -> Path:
    """One smoke run with both trackers (2 epochs)."""
    run_dir = workdir / "both"
    result = cnnlab(workdir, "+debug=smoke", BOTH, "logger.mlflow.experiment=both", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_tensorboard_has_every_epoch_hparams_final_metrics_and_the_confusion_matrix(tracked: Path) -> None:
    check_tensorboard(tracked)


def test_mlflow_run_has_params_history_final_metrics_and_artifacts(tracked: Path, workdir: Path) -> None:
    (run,) = mlflow_runs(workdir, "both")
    check_mlflow(run, tracked, workdir)


def test_resume_continues_the_same_tracker_runs_without_duplicate_epochs(tracked: Path, workdir: Path) -> None:
    before = json.loads((tracked / "summary.json").read_text())
    done = before["epochs_completed"]
    # What a crash between an epoch's log and its checkpoint leaves: an event past the checkpoint.
    with SummaryWriter(str(tracked / "tensorboard")) as stale:
        stale.add_scalar("loss/train", 99.0, done + 1)

    result = cnnlab(workdir, f"trainer.resume={tracked}", f"trainer.epochs={done + 1}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    after = json.loads((tracked / "summary.json").read_text())
    assert after["epochs_completed"] == done + 1
    assert after["trackers"]["mlflow_run_id"] == before["trackers"]["mlflow_run_id"]
    (run,) = mlflow_runs(workdir, "both")  # the same MLflow run, not a second one
    check_mlflow(run, tracked, workdir)
    # MLflow params cannot change, so the extended trainer.epochs is a tag
    assert run.data.params["trainer.epochs"] == str(done)
    assert run.data.tags["cnnlab.resume_changes"] == f"trainer.epochs: {done} -> {done + 1}"
    check_tensorboard(tracked)  # the stale point at epoch done+1 is gone, and every epoch shows once
    assert 99.0 not in [p.value for p in events(tracked / "tensorboard").Scalars("loss/train")]
    hparams, _ = hparams_info(events(tracked / "tensorboard"))
    assert hparams["trainer.epochs"] == done + 1  # one hparams record, the latest

    # A refused resume (nothing left to train) leaves both trackers as they were.
    tb_files = sorted(p.name for p in (tracked / "tensorboard").iterdir())
    refused = cnnlab(workdir, f"trainer.resume={tracked}")
    assert refused.returncode == 2 and "nothing to do" in refused.stdout + refused.stderr
    (again,) = mlflow_runs(workdir, "both")
    assert again.info.status == "FINISHED" and again.data.metrics == run.data.metrics
    assert again.data.tags["cnnlab.resume_changes"] == run.data.tags["cnnlab.resume_changes"]
    assert sorted(p.name for p in (tracked / "tensorboard").iterdir()) == tb_files


def test_failed_run_is_marked_failed_in_both_trackers(workdir: Path, tmp_path: Path) -> None:
    run_dir = workdir / "failed"
    result = cnnlab(workdir, "dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false",
                    "trainer.device=cpu", BOTH, "logger.mlflow.experiment=failed", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    (run,) = mlflow_runs(workdir, "failed")
    assert run.info.status == "FAILED" and run.data.tags["cnnlab.status"] == "failed"
    assert "idx files were not found" in run.data.tags["cnnlab.error"]
    assert {"summary.json", "train.log"} <= {a.path for a in store(workdir).list_artifacts(run.info.run_id)}
    _, status = hparams_info(events(run_dir / "tensorboard"))
    assert status == api_pb2.Status.Value("STATUS_FAILURE")


def test_sweep_gives_one_tracker_run_per_job(workdir: Path) -> None:
    sweep_dir = workdir / "sweep"
    result = cnnlab(workdir, "-m", "+debug=smoke", BOTH, "logger.mlflow.experiment=sweep", "optimizer.lr=0.05,0.01",
                    f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [p.name for p in job_dirs] == ["0_lr-0.05", "1_lr-0.01"]  # job number and the value that varies

    runs = mlflow_runs(workdir, "sweep")
    assert [r.info.run_name for r in runs] == [p.name for p in job_dirs]
    assert [r.data.params["optimizer.lr"] for r in runs] == ["0.05", "0.01"]
    assert {r.data.tags["cnnlab.sweep"] for r in runs} == {"sweep"}
    for run, job_dir in zip(runs, job_dirs):
        check_mlflow(run, job_dir, workdir)
        check_tensorboard(job_dir)
    # `tensorboard --logdir <sweep>` finds one run per job, each with its own learning rate
    lrs = sorted(hparams_info(events(job_dir / "tensorboard"))[0]["optimizer.lr"] for job_dir in job_dirs)
    assert lrs == pytest.approx([0.01, 0.05])


@pytest.mark.parametrize("tracker", ["mlflow", "tensorboard"])
def test_missing_package_is_a_config_error_naming_the_extra(workdir: Path, tracker: str) -> None:
    # The package hidden as if not installed; the run must stop before any data is loaded.
    code = (f"import sys; sys.modules[{tracker!r}] = None; sys.argv[0] = 'cnnlab'; "
            "from cnnlab.__main__ import main; main()")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [sys.executable, "-c", code, "+debug=smoke", f"logger={tracker}", f"hydra.run.dir={workdir / tracker}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"logger={tracker} needs the {tracker} package: pip install 'cnnlab[{tracker}]'" in output
    assert "Traceback" not in output and "data synthetic" not in output


# ------------------------------------------------------------------------------ in-process checks


def test_default_is_no_tracker_and_needs_neither_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = validate(compose_config("+debug=smoke"))
    assert run.logger.selected() == []
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    summary = Summary()
    trackers = open_trackers(run.logger, run.to_dict(), tmp_path, summary, resumed=False)
    trackers.log_epoch({"epoch": 1, "train_loss": 1.0})
    trackers.close(Summary(status="completed"), tmp_path)
    assert trackers.backends == [] and summary == Summary() and list(tmp_path.iterdir()) == []


def test_options_compose_side_by_side_and_bad_keys_are_config_errors() -> None:
    both = validate(compose_config(BOTH, "logger.mlflow.experiment=mine", "+logger.mlflow.tags.team=vision"))
    assert both.logger.selected() == ["tensorboard", "mlflow"]
    assert both.logger.tensorboard.dir == "tensorboard"
    assert (both.logger.mlflow.experiment, both.logger.mlflow.tags) == ("mine", {"team": "vision"})
    assert validate(compose_config("logger=none")).logger.selected() == []
    assert validate(compose_config("logger=[]")).logger.selected() == []
    with pytest.raises(ConfigError, match=r"logger\.mlflow\.artifacts: Value 'maybe' is not a valid bool.*; "
                                          r"logger\.mlflow\.artifacts takes a value of type bool"):
        validate(compose_config("logger=mlflow", "logger.mlflow.artifacts=maybe"))
    with pytest.raises(ConfigError, match=r"logger\.wandb: .*Valid keys of logger 'logger': tensorboard, mlflow"):
        validate(compose_config("+logger.wandb.project=x"))
    with pytest.raises(ConfigError, match=r"logger\.mlflow\.experiment is empty"):
        validate(compose_config("logger=mlflow", "logger.mlflow.experiment="))


def test_missing_packages_are_named_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    both = LoggerConfig(tensorboard=TensorBoardConfig(), mlflow=MlflowConfig())
    with pytest.raises(ConfigError) as err:
        check_installed(both)
    assert str(err.value) == ("logger=tensorboard needs the tensorboard package; logger=mlflow needs the sqlalchemy "
                              "package: pip install 'cnnlab[tensorboard,mlflow]'")
    # a tracking server needs no local database packages
    check_installed(LoggerConfig(mlflow=MlflowConfig(tracking_uri="http://127.0.0.1:5000")))


class Broken:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self, summary: Summary, run_dir: Path) -> None:
        self.closed = True


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.closed_with: str | None = None

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def close(self, summary: Summary, run_dir: Path) -> None:
        self.closed_with = summary.status
        raise RuntimeError("server went away")


def test_a_failing_tracker_is_switched_off_with_a_warning_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    broken, recorder = Broken(), Recorder()
    trackers = Trackers([broken, recorder])
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        trackers.log_epoch({"epoch": 1})
        trackers.log_epoch({"epoch": 2})  # the broken one is not called again: one warning, not one per epoch
        trackers.close(Summary(status="completed"), tmp_path)  # a close that raises is a warning too
    assert recorder.rows == [{"epoch": 1}, {"epoch": 2}] and recorder.closed_with == "completed"
    assert broken.calls == 1
    assert broken.closed  # off after its first failure, yet closed: an MLflow run must not stay "running"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "broken tracker failed in log_epoch and is off for the rest of this run" in warnings[0]
    assert "OSError: disk full" in warnings[0]
    assert "recorder tracker failed in close" in warnings[1]


def test_a_tracker_that_cannot_start_is_left_out(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = validate(compose_config("+debug=smoke", "logger=tensorboard", f"logger.tensorboard.dir={blocker / 'tb'}"))
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        trackers = open_trackers(run.logger, run.to_dict(), tmp_path / "run", Summary(), resumed=False)
    assert trackers.backends == []
    assert any("tensorboard tracker could not start" in r.getMessage() for r in caplog.records)
