"""`trainer.resume=<run dir or checkpoint>`: continue a run in its own directory, exactly.

The resumed run takes its config from the checkpoint; only the keys given on this command line
change, and only those that cannot change the results so far (more epochs, another device, ...).
It writes into the original run directory, so metrics.csv stays one continuous log.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cnnlab.checkpoint import atomic_write_text, load_checkpoint, restore_rng
from cnnlab.checks import ConfigError, under
from cnnlab.record import read_summary

RESUME_KEY = "trainer.resume"
# keys a resumed run may change: they do not alter what was trained so far
CHANGEABLE = (
    "trainer.epochs", "trainer.resume", "trainer.device", "trainer.progress", "trainer.eval_batch_size",
    "dataset.loader", "dataset.num_workers",  # resident and streaming give the same batches
    "dataset.root",  # where the data lies now (a cluster job that stages it elsewhere after a preemption)
    "trainer.num_threads", "trainer.compile", "trainer.compile_mode", "trainer.stop_when_stuck", "trainer.doctor_every", "viz", "report",
    "logger",  # trackers only mirror the run: switching them on or off on resume changes no result
)


@dataclass
class ResumePoint:
    run_dir: Path
    checkpoint: Path | None  # None: the run was stopped before its first checkpoint; it starts over, in place
    config: dict[str, Any] | None = None  # the run's config, from its record, when there is no checkpoint

    def saved_config(self) -> dict[str, Any]:
        """The config the run was trained with: the checkpoint's, else its record's."""
        if self.checkpoint is None:
            return self.config
        config = load_checkpoint(self.checkpoint, mmap=True).get("config")
        if not isinstance(config, dict):
            raise ConfigError(f"{self.checkpoint} holds no run config, so it cannot be resumed (was it written by "
                              f"another program?); start a new run")
        return config


def resume_point(path: str | Path) -> ResumePoint:
    """A run directory (its checkpoints/last.pt) or a checkpoint file inside one. A run directory
    without a checkpoint (stopped during its first epoch) resumes from the start, with the config
    its record holds."""
    path = Path(path).expanduser()
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.pt"
        if checkpoint.is_file():
            return ResumePoint(path.resolve(), checkpoint.resolve())
        config = _recorded_config(path)
        if config is None:
            raise ConfigError(f"{RESUME_KEY}={path}: no checkpoints/last.pt in that directory, and no run record "
                              "(summary.json with its config) to start the run over from; give a cnnlab run directory "
                              "(outputs/runs/...) or a checkpoint file (.../checkpoints/last.pt or best.pt)")
        return ResumePoint(path.resolve(), None, config)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return ResumePoint(run_dir.resolve(), path.resolve())
    raise ConfigError(f"{RESUME_KEY}={path} does not exist; give a cnnlab run directory or a checkpoint file")


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        config = read_summary(run_dir).config
    except (OSError, ValueError, TypeError):
        return None
    return config if isinstance(config, dict) and config else None


def resume_argv(argv: list[str]) -> list[str]:
    """Before Hydra starts: write into the resumed run's directory, and keep its .hydra/ as it was.

    Hydra would otherwise make a new run directory and record there the default config this
    command line composes, not the checkpoint's.
    """
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{RESUME_KEY}=")]
    if not given or given[-1] in ("", "null"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise ConfigError(f"{RESUME_KEY} continues one run; drop -m (to go on with a sweep, run its command "
                          f"again with its hydra.sweep.dir)")
    point = resume_point(given[-1])
    # the path goes to Hydra quoted, so any path works, = and , included (Hydra would read a sweep)
    quoted = f"{RESUME_KEY}={hydra_quote(given[-1])}"
    argv = [quoted if a.lstrip("+").startswith(f"{RESUME_KEY}=") else a for a in argv]
    extra = [f"hydra.run.dir={hydra_quote(str(point.run_dir))}", "hydra.output_subdir=null"]
    return argv + [e for e in extra if not any(a.startswith(e.split("=")[0] + "=") for a in argv)]


def hydra_quote(text: str) -> str:
    """`text` as one quoted value of Hydra's override grammar: only quotes, and backslashes before a
    quote or at the end, are escaped there."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


def resumed_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The checkpoint's config with this command line's changes, which must be CHANGEABLE ones."""
    resumed = OmegaConf.create(saved)
    parser = OverridesParser.create()
    changed = []
    for text in overrides:
        key = parser.parse_override(text).key_or_group
        if key in ("debug", "experiment") or key.startswith("hydra"):
            continue
        new = OmegaConf.select(cfg, key)
        if new == OmegaConf.select(resumed, key):
            continue
        if not under(key, CHANGEABLE):
            changed.append(f"{key} ({OmegaConf.select(resumed, key)} -> {new})")
            continue
        OmegaConf.update(resumed, key, new, merge=False)
    for key in cfg:  # groups newer than the checkpoint take this command line's values
        if key not in resumed:
            resumed[key] = cfg[key]
    if changed:
        raise ConfigError(
            f"cannot resume with a different {', '.join(changed)}: the checkpoint was trained with the first value. "
            f"A resumed run may change only {', '.join(CHANGEABLE)}; start a new run for anything else")
    return resumed


def check_epochs(epochs: int, done: int, checkpoint: Path | None, finished: bool) -> None:
    """A finished run resumes only to be extended. One whose epochs are all done but which never got
    its test score (stopped in between) is finished: scored and plotted, with no extra epoch."""
    if finished and epochs <= done and done:
        raise ConfigError(f"{checkpoint} has finished {done} epoch(s) and trainer.epochs={epochs}: nothing to do. "
                          f"Set trainer.epochs above {done} to extend the run")
    if epochs < done:
        raise ConfigError(f"{checkpoint} has trained {done} epoch(s), more than trainer.epochs={epochs}; resume with "
                          f"trainer.epochs={done} to finish it, or more to extend it")


def trim_metrics(run_dir: Path, epoch: int) -> dict[str, Any] | None:
    """metrics.csv as of the checkpoint's epoch: rows written after it (before a crash, never
    checkpointed) go, and so does a row torn by a kill in the middle of writing it. Returns the
    checkpoint epoch's row (None without one)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1]  # rows are appended whole and flushed: only the last can be torn
    if not whole:
        path.unlink()
        return None
    metrics = pd.read_csv(io.StringIO(whole))
    kept = metrics[metrics["epoch"] <= epoch]
    if len(kept) != len(metrics) or whole != text:
        atomic_write_text(path, kept.to_csv(index=False))
    rows = kept[kept["epoch"] == epoch]
    return {k: (None if pd.isna(v) else v) for k, v in rows.iloc[-1].items()} if len(rows) else None


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator, model_name: str, epochs: int,
            device: torch.device) -> dict[str, Any]:
    """Load a checkpoint into a freshly built run: weights, optimizer, schedule position, RNGs.

    The schedule itself is rebuilt from the config, so a larger trainer.epochs re-plans it; only
    its position (the step count) comes from the checkpoint. Returns the checkpoint."""
    ckpt = load_checkpoint(path, map_location=device)
    fused = [group.get("fused") for group in optimizer.param_groups]  # a property of this device, not the saved one
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, flag in zip(optimizer.param_groups, fused):
            group["fused"] = flag
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path} does not fit this {model_name} run (was it written for another model "
                          f"or optimizer?): {str(err).splitlines()[0]}") from None
    scheduler.load_state_dict(dict(ckpt["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas)))
    if ckpt["config"]["trainer"]["epochs"] != epochs:
        for group, base, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * schedule(scheduler.last_epoch)
    restore_rng(ckpt["rng"], generator)
    return ckpt
