"""Open a finished run for inference: checkpoint, typed config, model with its weights, pipeline.

`cnnlab evaluate` and `cnnlab predict` both start here, so a checkpoint is found, checked and
turned back into the exact model and input pipeline of its run in one place. Their `key=value`
command lines are parsed by cnnlab.cli; the values that are config values go through `parse_value`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from cnnlab.checkpoint import load_checkpoint
from cnnlab.checks import ConfigError, unwritable_reason
from cnnlab.config import RunConfig, validate
from cnnlab.data import DatasetSpec, Pipeline
from cnnlab.build import prepare, select_device, step_context
from cnnlab.engine import StepContext

CHECKPOINT_NAMES = ("best", "last")


# ------------------------------------------------------------------------------- arguments


def parse_value(key: str, text: str) -> Any:
    """A config value as the training command line reads it (Hydra's grammar): 50 -> int, null -> None."""
    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except HydraException as err:
        raise ConfigError(f"{key}={text}: {str(err).splitlines()[0]}") from None
    if override.is_sweep_override():
        raise ConfigError(f"{key}={text}: give one value (a comma list is a sweep, which only training runs)")
    return override.value()


def check_writable_dir(path: Path, key: str = "out") -> None:
    """Fail before any work when the output folder cannot be created or written; create it."""
    reason = unwritable_reason(path)
    if reason is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # os.access can say yes to what the file system then refuses
            reason = err.strerror or str(err)
    if reason:
        raise ConfigError(f"{key}={path} is not a writable folder ({reason}); choose another with {key}=<folder>")


# ------------------------------------------------------------------------------- opening a run


@dataclass
class OpenRun:
    """A run's checkpoint loaded for inference: model in eval mode on `device`, with its pipeline."""

    run_dir: Path
    checkpoint: Path
    epoch: int | None
    run: RunConfig  # the run's validated config, trainer.device/eval_batch_size as given here
    spec: DatasetSpec  # the dataset the model was trained on: input shape, class names
    pipeline: Pipeline  # the run's augmentation list, used in eval mode (deterministic ops only)
    model: torch.nn.Module
    device: torch.device
    notes: list[str]  # things the user should know (device fallback, ...)

    def context(self, pipeline: Pipeline | None = None) -> StepContext:
        """What engine.evaluate needs; `pipeline` replaces the run's (another dataset's input shape)."""
        return step_context(self.run.trainer, self.run.loss, pipeline or self.pipeline, self.spec.num_classes,
                            self.device)

    def describe(self) -> str:
        where = self.checkpoint.relative_to(self.run_dir) if self.checkpoint.is_relative_to(self.run_dir) else self.checkpoint
        return f"{self.run.model.label()} (epoch {self.epoch}, {where})"


def run_directory(path: str | None) -> Path:
    if not path:
        raise ConfigError("run=<run directory> is required, e.g. run=outputs/runs/2026-11-22_10-00-00_lenet_fashion_mnist")
    run_dir = Path(path).expanduser()
    if not run_dir.exists():
        raise ConfigError(f"run={path} does not exist; give a cnnlab run directory (outputs/runs/...)")
    if not run_dir.is_dir():
        raise ConfigError(f"run={path} is a file, not a run directory; give its run directory with run=<dir> "
                          f"and the file with checkpoint={path}")
    found = sorted((run_dir / "checkpoints").glob("*.pt"))
    if not found:
        raise ConfigError(f"run={path} is not a cnnlab run: it has no checkpoints/best.pt or last.pt "
                          f"(a run writes them after its first epoch)")
    return run_dir.resolve()


def find_checkpoint(run_dir: Path, name: str) -> Path:
    """best | last | a file name in <run>/checkpoints | a path to a checkpoint file."""
    folder = run_dir / "checkpoints"
    candidates = [folder / f"{name}.pt"] if name in CHECKPOINT_NAMES else [folder / name, Path(name).expanduser()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    present = ", ".join(p.stem for p in sorted(folder.glob("*.pt")) if p.stem in CHECKPOINT_NAMES) or "none"
    if name in CHECKPOINT_NAMES:
        raise ConfigError(f"checkpoint={name}: {folder} has no {name}.pt; this run has: {present}")
    raise ConfigError(f"checkpoint={name} is not a valid checkpoint; choose one of: {', '.join(CHECKPOINT_NAMES)} "
                      f"(this run has: {present}) or give the path of a checkpoint file")


def open_run(run_dir: str | Path | None, checkpoint: str = "best", device: str | None = None,
             eval_batch_size: str | int | None = None) -> OpenRun:
    """Load a run's checkpoint and rebuild its model and pipeline exactly as training built them.

    device None takes the run's own trainer.device, or auto when that device is absent here
    (a run trained on a GPU can be scored on a laptop).
    """
    run_dir = run_directory(None if run_dir is None else str(run_dir))
    path = find_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ConfigError(f"{path} holds no model weights and config; it was not written by a cnnlab run")
    cfg = OmegaConf.create(ckpt["config"])
    cfg.trainer.resume = None  # inference never continues training
    try:
        validate(cfg)  # the saved config on its own first, so a failure here is the checkpoint's, not the user's
    except ConfigError as err:
        raise ConfigError(f"{path}: its config does not validate with this cnnlab: {err}") from None
    notes = []
    if device is not None:
        cfg.trainer.device = parse_value("trainer.device", device)
    else:
        try:
            select_device(cfg.trainer.device)
        except ConfigError:
            notes.append(f"the run trained on trainer.device={cfg.trainer.device}, which is not available here; "
                         "using trainer.device=auto")
            cfg.trainer.device = "auto"
    if eval_batch_size is not None:
        cfg.trainer.eval_batch_size = parse_value("trainer.eval_batch_size", str(eval_batch_size))
    run = validate(cfg)
    saved = ckpt.get("spec")  # checkpoints from before it was recorded: read from the dataset config
    prep = prepare(run, DatasetSpec(**{**saved, "classes": tuple(saved["classes"]), "mean": tuple(saved["mean"]),
                                       "std": tuple(saved["std"])}) if saved else None, training=False)
    try:
        prep.model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        raise ConfigError(f"{path}: the weights do not fit the {run.model.label()} its config builds "
                          f"(written by another cnnlab version?): {str(err).splitlines()[0]}") from None
    model = prep.model.to(prep.device)
    if run.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return OpenRun(run_dir, path, ckpt.get("epoch"), run, prep.spec, prep.pipeline, model, prep.device, notes)


def writable_file(path: Path, key: str = "out") -> Path:
    """An output file's folder, created and checked before any work is done."""
    path = path.expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file path, e.g. {key}={path / 'predictions.csv'}")
    check_writable_dir(path.parent if str(path.parent) else Path("."), key)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{key}={path} exists and is not writable; choose another with {key}=<file>")
    return path


def with_stats(spec: DatasetSpec, like: DatasetSpec) -> DatasetSpec:
    """`spec`'s shape and classes with `like`'s normalization: a model expects the statistics it was trained with."""
    return dataclasses.replace(spec, mean=like.mean, std=like.std)
