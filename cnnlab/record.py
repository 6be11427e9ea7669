"""The run record: summary.json, typed, and the only code that writes it.

A run's status and results live in one `Summary`. `RunRecord` changes it through named events
(begin, built, resumed, epoch done, diverged, stuck, pruned, interrupted, failed, finished) and rewrites
summary.json atomically after each, so a run killed at any moment still says how far it got.
Readers (the sweep report, trackers, the console table) take a `Summary` with typed fields;
`read_summary` reads one back, tolerating files written by older or newer versions.

Fields that are None are left out of the file, except the few whose null means something
(`KEEP_NULL`: best_val_acc is null without a validation split; diagnosis is null when the
doctor looked and found nothing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import torch

import cnnlab
from cnnlab.checkpoint import write_json
from cnnlab.checks import ConfigError

log = logging.getLogger("cnnlab")


class Status(str, Enum):
    """A run's status in summary.json; a str, so `summary.status == "completed"` holds."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"  # the loss became NaN/inf; stopped there, still scored
    STUCK = "stuck"  # trainer.stop_when_stuck ended it; still scored
    PRUNED = "pruned"  # a search's pruner stopped it early (hydra/sweeper=optuna); still scored
    INTERRUPTED = "interrupted"  # a signal stopped it at a step boundary, checkpointed: resumable
    FAILED = "failed"
    # never written: what readers call a record that says running when no process holds its run
    # directory any more (SIGKILL, OOM kill, power loss); trainer.resume finishes it
    KILLED = "killed"

    def __str__(self) -> str:
        return self.value


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Summary:
    """What summary.json holds, in file order."""

    status: str = Status.RUNNING
    model: str | None = None
    dataset: str | None = None
    overrides: list[str] = field(default_factory=list)
    started_at: str | None = None
    cnnlab_version: str | None = None
    torch_version: str | None = None
    host: str | None = None
    pid: int | None = None  # the process that trains it (the latest one, after a resume)
    trackers: dict[str, Any] = field(default_factory=dict)  # where each experiment tracker mirrors the run
    resumes: list[dict[str, Any]] = field(default_factory=list)  # one entry per trainer.resume
    # what was built
    device: str | None = None
    num_classes: int | None = None
    seed: int | None = None
    input_shape: list[int] | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    model_size_mb: float | None = None
    macs_per_image: int | None = None
    flops_per_image: int | None = None
    reference: dict[str, Any] | None = None
    reference_comparison: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    precision: str | None = None
    loader: str | None = None
    world_size: int | None = None
    fused_group: dict[str, Any] | None = None  # the fused group that trained it last (hydra/launcher=fused): its jobs and how
    # progress, after every epoch
    epochs_completed: int | None = None
    train_seconds: float | None = None
    final_train_loss: float | None = None
    final_train_acc: float | None = None
    final_val_loss: float | None = None
    final_val_acc: float | None = None
    best_epoch: int | None = None
    best_val_acc: float | None = None  # null without a validation split
    diagnosis: dict[str, Any] | None = None  # the doctor's last finding; null when it found nothing
    # how it ended
    diverged_epoch: int | None = None
    diverged_step: int | None = None
    hints: list[str] | None = None
    stopped_at_epoch: int | None = None
    interrupted_at: dict[str, int] | None = None  # {"epoch", "step"}
    resume_command: str | None = None
    error: str | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    test_checkpoint: str | None = None  # best | last: the weights the test set was scored with
    feature_maps: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    finished_at: str | None = None

    KEEP_NULL = ("best_epoch", "best_val_acc", "diagnosis")  # written as null once an epoch is done
    FINAL_METRICS = ("test_acc", "test_loss", "best_val_acc", "best_epoch", "final_train_loss", "final_train_acc",
                     "final_val_loss", "final_val_acc", "epochs_completed", "train_seconds", "params_total",
                     "params_trainable", "model_size_mb", "flops_per_image")

    def to_dict(self) -> dict[str, Any]:
        trained = self.epochs_completed is not None
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == [] or value == {}:
                if not (trained and f.name in self.KEEP_NULL) and f.name not in ("status", "overrides"):
                    continue
            out[f.name] = str(value) if f.name == "status" else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Known keys only, so a file from another version still reads; a value of the wrong type (a
        hand-edited or damaged file) is a ValueError naming it, so readers never format garbage."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in fields and value is not None and not _of_type(value, fields[key]):
                raise ValueError(f"{key} is {value!r}, not {fields[key].split(' |')[0]}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def final_metrics(self) -> dict[str, float]:
        """The numeric results, for trackers: test and best-validation scores, sizes, time."""
        values = {key: getattr(self, key) for key in self.FINAL_METRICS}
        return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def finished(self) -> bool:
        """Ended with a result: scored on the test set (diverged, stuck and pruned runs are scored too)."""
        return self.status in (Status.COMPLETED, Status.DIVERGED, Status.STUCK, Status.PRUNED)


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "list": (list,), "dict": (dict,)}


def _of_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated (as text) `float | None`, `list[str]`, ...; no bools for numbers."""
    base = annotation.split("|")[0].strip().split("[")[0]
    return isinstance(value, _TYPES.get(base, (object,))) and not (isinstance(value, bool) and base in ("int", "float"))


def read_summary(run_dir: Path) -> Summary:
    """A run directory's summary.json; OSError or ValueError when it is missing or unreadable.

    A record that says running while no process holds the run directory reads as killed."""
    data = json.loads((Path(run_dir) / "summary.json").read_text())
    if not isinstance(data, dict):
        raise ValueError("summary.json does not hold an object")
    summary = Summary.from_dict(data)
    if summary.status == Status.RUNNING and not is_live(run_dir):
        summary.status = Status.KILLED
    return summary


LOCK_FILE = ".cnnlab.lock"  # in the run directory: held by the process training it


@contextlib.contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for this process: a second process (a new run or a resume) is refused.

    An advisory lock (flock) on a file in the directory: the kernel releases it when the process
    ends, however it ends, so a killed run never leaves a stale lock. POSIX only; elsewhere no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"run directory {run_dir} is in use by {holder}, which is training in it; two "
                              f"processes never share a run directory. Wait for that one to end (or stop it), "
                              f"then try again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"cnnlab pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_live(run_dir: Path) -> bool:
    """Whether a process holds the run directory now (see `claim`); True where that cannot be known."""
    path = Path(run_dir) / LOCK_FILE
    try:
        import fcntl
    except ImportError:
        return True
    if not path.is_file():
        return False
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except BlockingIOError:
        return True
    except OSError:  # unreadable: do not call a run killed on a guess
        return True


class RunRecord:
    """Owns a run's summary.json. Every event updates the Summary and rewrites the file atomically.

    The record is written from `begin` (a new run) or `resumed` (a resumed one) on. Until then
    nothing is written, so a resume refused before training (a wrong checkpoint, nothing left to
    do) leaves the run's record as it was; a run that fails even before it begins gets a record
    of the failure only where the directory holds none. `writes=False` (torchrun ranks other
    than 0) keeps the record in memory.
    """

    def __init__(self, run_dir: Path, summary: Summary, writes: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.summary = summary
        self.writes = writes
        self.live = False  # True from begin/resumed on: this process's events are the run's record

    @classmethod
    def new(cls, run_dir: Path, overrides: list[str], writes: bool = True) -> RunRecord:
        return cls(run_dir, Summary(overrides=list(overrides)), writes)

    @classmethod
    def for_resume(cls, run_dir: Path, overrides: list[str], writes: bool = True) -> RunRecord:
        """The record a resume continues: the summary.json the run has (a fresh one if it has none)."""
        try:
            summary = read_summary(run_dir)
        except (OSError, ValueError):  # killed before its first write, or the file is damaged
            summary = Summary(overrides=list(overrides))
        return cls(run_dir, summary, writes)

    def _write(self) -> None:
        if self.live and self.writes:
            write_json(self.run_dir / "summary.json", self.summary.to_dict())

    def _close(self) -> None:
        self.summary.finished_at = now()
        self._write()

    def begin(self, model: str, dataset: str, config: dict[str, Any]) -> None:
        """A new run starts: status running, what it is, where it runs."""
        s = self.summary
        s.status, s.model, s.dataset, s.config = Status.RUNNING, model, dataset, config
        s.started_at, s.cnnlab_version, s.torch_version = now(), cnnlab.__version__, torch.__version__
        s.host, s.pid = platform.node(), os.getpid()
        self.live = True
        self._write()

    def resumed(self, checkpoint: Path | None, epoch: int, step: int, epochs: int, overrides: list[str],
                config: dict[str, Any]) -> None:
        """The checkpoint is restored and training goes on: the previous ending is cleared."""
        s = self.summary
        s.resumes.append({"at": now(), "checkpoint": str(checkpoint) if checkpoint else None, "epoch": epoch, "step": step,
                          "epochs": epochs, "overrides": list(overrides)})
        if s.fused_group and epoch < epochs:  # the group that trained it so far; a group that takes it on says so anew
            s.resumes[-1]["fused_group"], s.fused_group = s.fused_group, None
        s.status, s.config, s.host, s.pid = Status.RUNNING, config, platform.node(), os.getpid()
        if s.started_at is None:  # its summary.json was lost (unreadable): what begin() wrote, from the config
            model = config.get("model") or {}
            s.model, s.dataset = model.get("_target_") or model.get("name"), (config.get("dataset") or {}).get("name")
            s.started_at, s.cnnlab_version, s.torch_version = now(), cnnlab.__version__, torch.__version__
        s.error = s.interrupted_at = s.resume_command = s.diagnosis = s.finished_at = None
        s.diverged_epoch = s.diverged_step = s.hints = s.stopped_at_epoch = None
        s.test_loss = s.test_acc = s.test_checkpoint = s.feature_maps = None
        self.live = True
        self._write()

    def restored(self, epoch: int, train_seconds: float, best_epoch: int, best_val_acc: float | None,
                 row: dict[str, Any] | None) -> None:
        """The progress as of the checkpoint a resume starts from (the file may lag it by an epoch);
        `row`: that epoch's metrics.csv row."""
        if not epoch:
            return
        row = row or {}
        self.summary.best_epoch, self.summary.best_val_acc = best_epoch, best_val_acc
        self.epoch_done(epoch, train_seconds, row.get("train_loss"), row.get("train_acc"), row.get("val_loss"),
                        row.get("val_acc"))

    def built(self, **fields: Any) -> None:
        """What was built: device, sizes, the model card's numbers, precision, loader."""
        for key, value in fields.items():
            if not hasattr(self.summary, key):
                raise AttributeError(f"Summary has no field {key!r}")
            setattr(self.summary, key, value)
        self._write()

    def epoch_done(self, epoch: int, train_seconds: float, train_loss: float, train_acc: float,
                   val_loss: float | None, val_acc: float | None) -> None:
        s = self.summary
        s.epochs_completed, s.train_seconds = epoch, round(train_seconds, 3)
        s.final_train_loss, s.final_train_acc = train_loss, train_acc
        if val_loss is not None:
            s.final_val_loss, s.final_val_acc = val_loss, val_acc
        self._write()

    def examined(self, diagnosis: dict[str, Any] | None) -> None:
        """The doctor's verdict (None: it found nothing wrong); written with the epoch."""
        self.summary.diagnosis = diagnosis

    def best(self, epoch: int | None, val_acc: float | None) -> None:
        """The epoch whose weights are best.pt (val_acc None without a validation split); written with the epoch."""
        self.summary.best_epoch, self.summary.best_val_acc = epoch, val_acc

    def diverged(self, epoch: int, step: int, hints: list[str]) -> None:
        s = self.summary
        s.status, s.diverged_epoch, s.diverged_step, s.hints = Status.DIVERGED, epoch, step, hints
        self._write()

    def stuck(self, epoch: int) -> None:
        self.summary.status, self.summary.stopped_at_epoch = Status.STUCK, epoch
        self._write()

    def pruned(self, epoch: int) -> None:
        self.summary.status, self.summary.stopped_at_epoch = Status.PRUNED, epoch
        self._write()

    def interrupted(self, epoch: int | None = None, step: int | None = None, train_seconds: float | None = None,
                    resume_command: str | None = None) -> None:
        """A signal stopped the run; with `epoch`: checkpointed there, and how to continue."""
        s = self.summary
        s.status = Status.INTERRUPTED
        if epoch is not None:
            s.interrupted_at, s.resume_command = {"epoch": epoch, "step": step}, resume_command
            s.train_seconds = round(train_seconds, 3)
        self._close()

    def failed(self, error: BaseException) -> None:
        """status: failed and the error; the first failure recorded stands."""
        if self.summary.status == Status.FAILED and self.summary.error:
            return
        if not self.live and (self.run_dir / "summary.json").exists():
            return  # a resume refused before training, or a directory holding another record
        self.live = True
        self.summary.status, self.summary.error = Status.FAILED, f"{type(error).__name__}: {error}"
        try:
            self._close()
        except (OSError, ConfigError) as err:  # a full disk, say: the failure itself is what the user must see
            log.warning("the failure could not be recorded in %s: %s", self.run_dir / "summary.json", err)

    def tested(self, loss: float, acc: float, checkpoint: str) -> None:
        self.summary.test_loss, self.summary.test_acc, self.summary.test_checkpoint = loss, acc, checkpoint
        self._write()

    def finished(self, feature_maps: dict[str, Any] | None = None) -> None:
        """Training and scoring are over: completed, unless it diverged or got stuck on the way."""
        s = self.summary
        if feature_maps is not None:
            s.feature_maps = feature_maps
        if s.status == Status.RUNNING:
            s.status = Status.COMPLETED
        self._close()
