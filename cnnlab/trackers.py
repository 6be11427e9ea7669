"""Experiment trackers (the `logger` config group): mirror a run into TensorBoard and/or MLflow.

Hook points, all called by cnnlab.fit.fit on the process that writes files:
    trackers = open_trackers(cfg, config, run_dir, summary, resumed)  # before training; may resume a tracker run
    trackers.log_epoch(row)                                           # after each metrics.csv row
    trackers.close(summary, run_dir)                                  # at the end, whatever the status

They get built values: the logger config, the run config as a plain dict (its hyperparameters),
and the run's typed Summary (record.py), which they read and into which they note where they
write (summary.trackers).

The run directory stays the record of truth; trackers are views of it. So a tracker that fails
while the run is going (a full disk, a tracking server that went away) is switched off with a
warning and never costs the run. What the user got wrong (an unknown key, a package that is not
installed) is a ConfigError before any data is loaded.

This module imports neither tensorboard nor mlflow at import time: a run without trackers pays
nothing. cnnlab.config imports the schema below; this module imports no config module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Protocol

from cnnlab.checks import ConfigError, importable, under
from cnnlab.record import Status, Summary

log = logging.getLogger("cnnlab")

# --------------------------------------------------------------------------------------- config


@dataclass
class TensorBoardConfig:
    dir: str = "tensorboard"  # relative paths are inside the run directory

    def validate(self, prefix: str = "logger.tensorboard") -> None:
        if not str(self.dir).strip():
            raise ConfigError(f"{prefix}.dir is empty; give a directory (relative paths are inside the run directory)")


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else the local sqlite store in `dir`
    dir: str = "outputs/mlflow"  # the local store: mlflow.db + artifacts/, relative to the working directory
    experiment: str = "cnnlab"
    artifacts: bool = True
    log_checkpoints: bool = False
    tags: dict[str, str] = field(default_factory=dict)

    def validate(self, prefix: str = "logger.mlflow") -> None:
        if not self.experiment.strip():
            raise ConfigError(f"{prefix}.experiment is empty; name the MLflow experiment (default: cnnlab)")
        if not self.uri() and not str(self.dir).strip():
            raise ConfigError(f"{prefix}.dir is empty; give the local store's directory or set {prefix}.tracking_uri")

    def uri(self) -> str | None:
        """The tracking URI the user chose (this key, then MLflow's own environment variable), or None."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def local_dir(self) -> Path | None:
        """The directory of cnnlab's own local store, when that is where runs go."""
        return None if self.uri() else Path(self.dir).expanduser().resolve()


@dataclass
class LoggerConfig:
    """Which trackers a run feeds: each option file of conf/logger/ fills in its own key, so
    `logger=[tensorboard,mlflow]` merges both; none selected (the default) means no tracker."""

    tensorboard: Optional[TensorBoardConfig] = None
    mlflow: Optional[MlflowConfig] = None

    def selected(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def validate(self, prefix: str = "logger") -> None:
        # Whether the packages are installed is checked when the run opens its trackers
        # (check_installed), not here: a checkpoint's saved config must still validate for
        # inference on a machine without the tracker packages.
        for name in self.selected():
            getattr(self, name).validate(f"{prefix}.{name}")


def required_packages(cfg: LoggerConfig) -> dict[str, list[str]]:
    """tracker -> the import names it needs, given where it writes."""
    needs: dict[str, list[str]] = {}
    if cfg.tensorboard is not None:
        needs["tensorboard"] = ["tensorboard"]  # torch.utils.tensorboard writes through it
    if cfg.mlflow is not None:
        uri = cfg.mlflow.uri()
        local_db = uri is None or uri.startswith("sqlite:")
        needs["mlflow"] = ["mlflow"] + (["sqlalchemy", "alembic"] if local_db else [])
    return needs


def check_installed(cfg: LoggerConfig) -> None:
    """One ConfigError naming every missing package and the pip extra that brings it."""
    problems, extras = [], []
    for tracker, modules in required_packages(cfg).items():
        missing = [m for m in modules if not importable(m)]
        if missing:
            noun = "package" if len(missing) == 1 else "packages"
            problems.append(f"logger={tracker} needs the {' and '.join(missing)} {noun}")
            extras.append(tracker)
    if problems:
        raise ConfigError(f"{'; '.join(problems)}: pip install 'cnnlab[{','.join(extras)}]'")


# ----------------------------------------------------------------------------- shared helpers

# per-epoch metrics.csv column -> TensorBoard tag; grouped so train and val sit in one section
TB_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_loss": "loss/test",  # trainer.test_every_epoch
    "test_acc": "accuracy/test",
    "lr": "lr",
    "epoch_seconds": "time/epoch_seconds",
    "images_per_second": "time/images_per_second",
}
# files of the run directory uploaded as MLflow artifacts, when they exist
ARTIFACTS = (
    "summary.json", "metrics.csv", "curves.png", "confusion_matrix.png", "confusion_matrix.csv",
    "per_class_accuracy.csv", "model_summary.txt", "feature_maps.png",
)
# cnnlab status -> MLflow run status. Failed, diverged and stuck runs all ended without a model
# that learned; an interrupted run was stopped by a signal and can be resumed (KILLED), and a pruned
# one was stopped on purpose by a search, with the model it had (KILLED too).
MLFLOW_STATUS = {Status.COMPLETED: "FINISHED", Status.INTERRUPTED: "KILLED", Status.FAILED: "FAILED",
                 Status.DIVERGED: "FAILED", Status.STUCK: "FAILED", Status.PRUNED: "KILLED"}
# cnnlab status -> TensorBoard HParams session status (it has no "killed": interrupted is unknown;
# a pruned run ended as it should, with a scored model)
TB_STATUS = {Status.COMPLETED: "STATUS_SUCCESS", Status.INTERRUPTED: "STATUS_UNKNOWN", Status.FAILED: "STATUS_FAILURE",
             Status.DIVERGED: "STATUS_FAILURE", Status.STUCK: "STATUS_FAILURE", Status.PRUNED: "STATUS_SUCCESS"}
# left out of params/hparams: tracker settings and the resume path do not change results
NOT_HPARAMS = ("logger", "trainer.resume")


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config as dotted keys with scalar values (bool, int, float, str): the same keys for
    every run of a model family, so a sweep lines up in MLflow and in TensorBoard's HParams tab."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if under(name, NOT_HPARAMS):
                continue
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif value is None:
                flat[name] = "None"  # hparams take no null; MLflow params are strings anyway
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value
            else:  # lists (augmentation ops, VGG arch): one value, compared as text
                flat[name] = json.dumps(value, default=str)

    walk(config, "")
    return flat


def epoch_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.csv row's numbers; "" (no validation split) is left out, not logged as 0."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)}


def _seconds(iso: str | None) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else time.time()
    except ValueError:
        return time.time()


def _sweep_dir() -> Path | None:
    """The sweep directory when this run is a job of a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        return Path(hydra_cfg.sweep.dir).resolve() if hydra_cfg.mode == RunMode.MULTIRUN else None
    except Exception:  # noqa: BLE001 - outside a Hydra job (tests, scripts) there is no sweep
        return None


class Backend(Protocol):
    name: str

    def log_epoch(self, row: dict[str, Any]) -> None: ...

    def close(self, summary: Summary | None, run_dir: Path) -> None: ...


# --------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Per-epoch scalars in one event file; hparams, final metrics, the confusion matrix and the
    model card in a second one ("*.final") that each close rewrites.

    Why two files: TensorBoard keeps the *first* hparams record of a run directory, so a resumed
    run could not update its status or hyperparameters by appending. Deleting and rewriting the
    small final file keeps exactly one. The per-epoch file is only appended to; a resumed run
    opens it with purge_step, so epochs written after the last checkpoint are not shown twice.
    """

    name = "tensorboard"
    FINAL_SUFFIX = ".final"

    def __init__(self, cfg: TensorBoardConfig, hparams: dict[str, Any], run_dir: Path, summary: Summary,
                 resumed: bool) -> None:
        importlib.import_module("torch.utils.tensorboard")  # a resumed run opens later: fail here, not then

        path = Path(cfg.dir).expanduser()
        self.dir = path if path.is_absolute() else run_dir / path
        self.run_dir = run_dir
        self.hparams = hparams
        self.started = _seconds(summary.started_at)
        self.writer: Any = None
        summary.trackers["tensorboard_dir"] = str(self.dir.resolve())
        if not resumed:  # a resumed run opens at its first new epoch, where purge_step is known
            self._open(purge_step=None)
        log.info("tensorboard: writing to %s (view: tensorboard --logdir %s)", self.dir, self.dir.parent)

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)
        # the Custom Scalars tab: train and val on one chart
        self.writer.add_custom_scalars({"cnnlab": {
            "loss": ["Multiline", ["loss/train", "loss/val"]],
            "accuracy": ["Multiline", ["accuracy/train", "accuracy/val"]],
        }})
        self._write_final(None)  # the HParams tab lists the run as running from now on

    def log_epoch(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if self.writer is None:
            self._open(purge_step=epoch)
        for key, value in epoch_values(row).items():
            if key in TB_TAGS:
                self.writer.add_scalar(TB_TAGS[key], value, epoch)
        self.writer.flush()  # a live `tensorboard` sees each epoch as it ends

    def close(self, summary: Summary | None, run_dir: Path) -> None:
        self.run_dir = run_dir
        try:
            if summary is not None:  # None: a refused resume, which changed nothing to show
                self._write_final(summary)
        finally:
            if self.writer is not None:
                self.writer.close()

    def _write_final(self, summary: Summary | None) -> None:
        """The HParams session (start; with a summary, also its end, final metrics and images).

        Built from the hparams plugin's metadata module: its own session_start_pb/session_end_pb
        (tensorboard.plugins.hparams.summary) import TensorFlow, and torch's summary.hparams()
        always adds an experiment record (which would hide runs of other model families), takes
        no start time and marks every session a success."""
        from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from torch.utils.tensorboard import summary as tb_summary
        from torch.utils.tensorboard.writer import FileWriter

        def plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> SummaryProto:
            return SummaryProto(value=[SummaryProto.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                                          tensor=TensorProto(dtype="DT_FLOAT"))])

        # No experiment-level record: TensorBoard then builds the HParams table from every run's
        # session start, so runs of different model families (different keys) all show.
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=self.started)
        for key, value in self.hparams.items():
            if isinstance(value, bool):  # before the number check: a bool is an int
                start.hparams[key].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[key].number_value = value
            else:
                start.hparams[key].string_value = str(value)

        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob(f"events.out.tfevents.*{self.FINAL_SUFFIX}"):
            old.unlink()
        writer = FileWriter(str(self.dir), filename_suffix=self.FINAL_SUFFIX)
        try:
            writer.add_summary(plugin_summary(metadata.SESSION_START_INFO_TAG,
                                              plugin_data_pb2.HParamsPluginData(session_start_info=start)), 0)
            if summary is None:
                return
            step = int(summary.epochs_completed or 0)
            status = api_pb2.Status.Value(TB_STATUS.get(summary.status, "STATUS_FAILURE"))
            end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
            writer.add_summary(plugin_summary(metadata.SESSION_END_INFO_TAG,
                                              plugin_data_pb2.HParamsPluginData(session_end_info=end)), step)
            for key, value in summary.final_metrics().items():  # the HParams tab's metric columns
                writer.add_summary(tb_summary.scalar(f"final/{key}", value), step)
            for image in ("confusion_matrix", "feature_maps"):
                path = self.run_dir / f"{image}.png"
                if path.is_file():
                    writer.add_summary(tb_summary.image(image, _read_png(path), dataformats="HWC"), step)
            writer.add_summary(tb_summary.text("run", _run_text(summary)), step)
            card = self.run_dir / "model_summary.txt"
            if card.is_file():  # indented: TensorBoard renders text as markdown, this keeps the table
                writer.add_summary(tb_summary.text("model_summary", _code_block(card.read_text())), step)
        finally:
            writer.close()


def _read_png(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _run_text(summary: Summary) -> str:
    diagnosis = json.dumps(summary.diagnosis, default=str)[:500] if summary.diagnosis else None
    shown = {"error": summary.error, "diagnosis": diagnosis, "test_acc": summary.test_acc,
             "best_val_acc": summary.best_val_acc, "best_epoch": summary.best_epoch,
             "epochs_completed": summary.epochs_completed, "device": summary.device, "overrides": summary.overrides}
    lines = [f"**status** {summary.status}"]
    lines += [f"**{key}** {value}" for key, value in shown.items() if value not in (None, "", [], {})]
    return "  \n".join(lines)


# -------------------------------------------------------------------------------------- MLflow


@contextlib.contextmanager
def _store_lock(directory: Path | None) -> Iterator[None]:
    """Serialise creating the local sqlite store and its experiment: the jobs of a parallel sweep
    start together, and two processes creating the same tables or experiment would collide."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; parallel local sweeps may race
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowTracker:
    """One MLflow run per cnnlab run, through MlflowClient (no global active run, so the jobs of a
    sequential sweep in one process cannot leak into each other). The run id is kept in
    summary["trackers"]["mlflow_run_id"], so trainer.resume reopens the same run."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, hparams: dict[str, Any], run_dir: Path, summary: Summary,
                 resumed: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on a new store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.cfg = cfg
        self.run_dir = run_dir.resolve()
        store = cfg.local_dir()
        self.uri = cfg.uri() or f"sqlite:///{store / 'mlflow.db'}"
        with _store_lock(store):
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                artifacts = (store / "artifacts").as_uri() if store else None
                experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment_id)
        self.params = {k: _param_value(str(v)) for k, v in hparams.items()}
        self.run_id = self._previous_run(summary, experiment_id) if resumed else None
        self.reopened = self.run_id is not None
        self.first_epoch = True
        if not self.reopened:
            tags = {"cnnlab.run_dir": str(self.run_dir), "cnnlab.model": str(summary.model),
                    "cnnlab.dataset": str(summary.dataset), "cnnlab.overrides": " ".join(summary.overrides),
                    **{str(k): str(v) for k, v in cfg.tags.items()}}
            sweep = _sweep_dir()
            if sweep is not None:
                tags["cnnlab.sweep"] = sweep.name
            created = self.client.create_run(experiment_id, run_name=self.run_dir.name, tags=_context_tags(tags))
            self.run_id = created.info.run_id
            self._batches(params=[Param(k, v) for k, v in self.params.items()])
        summary.trackers.update(
            mlflow_run_id=self.run_id, mlflow_experiment_id=experiment_id, mlflow_tracking_uri=self.uri)
        log.info("mlflow: run %s (%s) in experiment %r at %s%s", self.run_dir.name, self.run_id, cfg.experiment,
                 self.uri, f" (view: mlflow ui --backend-store-uri {self.uri})" if store else "")

    def _previous_run(self, summary: Summary, experiment_id: str) -> str | None:
        """The run a resumed cnnlab run continues: summary.json's id, else the one tagged with this run dir
        (a run killed hard never wrote its summary.json)."""
        run_id = summary.trackers.get("mlflow_run_id")
        try:
            if run_id and self.client.get_run(run_id).info.lifecycle_stage != "deleted":
                return run_id
        except Exception:  # noqa: BLE001 - not in this store (another tracking URI): look it up by directory
            pass
        try:
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`cnnlab.run_dir` = '{self.run_dir}'", max_results=1,
                order_by=["attributes.start_time DESC"])
        except Exception:  # noqa: BLE001 - e.g. a quote in the path the filter cannot take
            found = []
        if found:
            return found[0].info.run_id
        log.warning("mlflow: no earlier MLflow run of %s in experiment %r at %s; a new one starts at the "
                    "resumed epoch", self.run_dir, self.cfg.experiment, self.uri)
        return None

    def _continue(self, epoch: int) -> None:
        """The resumed run really trains again: mark the MLflow run running and bring it up to date."""
        from mlflow.entities import Param

        self.client.update_run(self.run_id, status="RUNNING")
        data = self.client.get_run(self.run_id).data
        # MLflow params cannot change: new keys are logged, changed ones (e.g. trainer.epochs raised
        # to extend the run) are listed in a tag
        self._batches(params=[Param(k, v) for k, v in self.params.items() if k not in data.params])
        changed = [f"{k}: {data.params[k]} -> {v}" for k, v in self.params.items()
                   if k in data.params and data.params[k] != v]
        if changed:
            self.client.set_tag(self.run_id, "cnnlab.resume_changes", "; ".join(changed)[:5000])
        if "cnnlab.error" in data.tags:  # the failure this resume recovers from
            self.client.delete_tag(self.run_id, "cnnlab.error")
        if any(m.step >= epoch for m in self.client.get_metric_history(self.run_id, "train_loss")):
            log.warning("mlflow: the run already has epoch %d or later, logged after the last checkpoint before "
                        "the run stopped; MLflow cannot delete metric points, so those epochs show twice there "
                        "(metrics.csv and TensorBoard keep one)", epoch)

    def _batches(self, metrics: list[Any] | None = None, params: list[Any] | None = None) -> None:
        for start in range(0, len(params or []), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        for start in range(0, len(metrics or []), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        epoch = int(row["epoch"])
        if self.first_epoch:
            self.first_epoch = False
            if self.reopened:
                self._continue(epoch)
        now = int(time.time() * 1000)
        self._batches(metrics=[Metric(k, v, now, epoch) for k, v in epoch_values(row).items()])

    def close(self, summary: Summary | None, run_dir: Path) -> None:
        from mlflow.entities import Metric

        if summary is None:  # the resume was refused before training: leave MLflow as it was
            if not self.reopened:  # but not an empty run made for it
                self.client.delete_run(self.run_id)
            return
        try:
            now = int(time.time() * 1000)
            step = int(summary.epochs_completed or 0)
            self._batches(metrics=[Metric(k, v, now, step) for k, v in summary.final_metrics().items()])
            self.client.set_tag(self.run_id, "cnnlab.status", str(summary.status))
            if summary.error:
                self.client.set_tag(self.run_id, "cnnlab.error", summary.error[:5000])
            if self.cfg.artifacts:
                self._log_artifacts(run_dir)
        finally:  # whatever failed above, the run must not stay RUNNING
            self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(summary.status, "FAILED"))

    def _log_artifacts(self, run_dir: Path) -> None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for log_file in sorted(run_dir.glob("*.log")):  # what the console showed, for failed runs above all
            self.client.log_artifact(self.run_id, str(log_file))
        for yaml in sorted((run_dir / ".hydra").glob("*.yaml")):
            self.client.log_artifact(self.run_id, str(yaml), artifact_path="hydra")
        if self.cfg.log_checkpoints:
            for ckpt in ("best.pt", "last.pt"):
                if (run_dir / "checkpoints" / ckpt).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / "checkpoints" / ckpt), "checkpoints")


def _param_value(value: str) -> str:
    """MLflow refuses a whole batch over one param value that is too long: shorten it instead."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500  # the oldest limit
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's usual source tags (user, source name, git commit), as mlflow.start_run adds them."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags(tags)
    except Exception:  # noqa: BLE001 - only decoration
        return tags


# ------------------------------------------------------------------------------------ the hooks

BACKENDS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers, side by side; none configured: every hook does nothing.

    A tracker that raises is switched off with a warning: a tracker never costs the user the run.
    It is still closed at the end (quietly), so that its MLflow run, say, is not left "running".
    """

    def __init__(self, backends: list[Backend] | None = None) -> None:
        self.backends = list(backends or [])
        self.switched_off: list[Backend] = []

    def _failed(self, backend: Backend, hook: str, err: BaseException) -> None:
        self.backends.remove(backend)
        self.switched_off.append(backend)
        log.warning("%s tracker failed in %s and is off for the rest of this run (the run goes on): %s: %s",
                    backend.name, hook, type(err).__name__, err,
                    exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")

    def log_epoch(self, row: dict[str, Any]) -> None:
        for backend in list(self.backends):
            try:
                backend.log_epoch(row)
            except Exception as err:  # noqa: BLE001 - see the class docstring
                self._failed(backend, "log_epoch", err)

    def close(self, summary: Summary | None, run_dir: Path) -> None:
        """summary None: a resume refused before training; each tracker leaves its run as it was."""
        failed_earlier = list(self.switched_off)
        for backend in list(self.backends):
            try:
                backend.close(summary, run_dir)
            except Exception as err:  # noqa: BLE001
                self._failed(backend, "close", err)
        for backend in failed_earlier:  # already warned about: another failure would say nothing new
            with contextlib.suppress(Exception):
                backend.close(summary, run_dir)
        self.backends, self.switched_off = [], []


def open_trackers(cfg: LoggerConfig | None, config: dict[str, Any], run_dir: Path, summary: Summary,
                  resumed: bool) -> Trackers:
    """Start (or, for trainer.resume, reopen) the run's trackers; `config` is the run config as a dict.

    A missing package is the user's to fix: ConfigError (exit status 2) before any data is loaded.
    A tracker that fails to start (an unreachable server, say) is left out with a warning.
    """
    if cfg is None or not cfg.selected():
        return Trackers()
    check_installed(cfg)
    hparams = flat_config(config)
    backends = []
    for name in cfg.selected():
        try:
            backends.append(BACKENDS[name](getattr(cfg, name), hparams, Path(run_dir), summary, resumed))
        except Exception as err:  # noqa: BLE001 - never cost the run
            log.warning("%s tracker could not start and is off for this run (the run goes on): %s: %s",
                        name, type(err).__name__, err, exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
    return Trackers(backends)
