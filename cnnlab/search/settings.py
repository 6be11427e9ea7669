"""The Optuna sweeper's settings (conf/hydra/sweeper/optuna.yaml), checked, and the Optuna objects they
name: sampler, pruner, storage. The sweeper process and every trial's process build them alike, so a
trial's pruning decision uses the same pruner however the launcher runs it."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cnnlab.checks import ConfigError, check_choice, check_range, importable

# metric -> (its direction, whether the value reported after each epoch is the best so far)
METRICS: dict[str, tuple[str, bool]] = {
    "best_val_acc": ("maximize", True),
    "final_val_acc": ("maximize", False),
    "final_val_loss": ("minimize", False),
}
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "asha", "hyperband")
STUDY_FILE = "optuna_study.log"  # the study's journal in the sweep dir, when storage is null
SWEEPER_TARGET = "hydra_plugins.cnnlab_search.optuna_sweeper.OptunaSweeper"


@dataclass
class SearchSettings:
    """hydra.sweeper's keys; `params` (the preset's search space) is read by the sweeper itself."""

    n_trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    metric: str = "best_val_acc"
    direction: str | None = None
    pruner: str = "median"
    min_epochs: int = 1
    reduction_factor: int = 3
    startup_trials: int = 5
    storage: str | None = None
    study_name: str | None = None
    n_jobs: int | None = None

    @classmethod
    def from_config(cls, node: Any) -> SearchSettings:
        """From hydra.sweeper (a DictConfig or dict); keys that are not settings (_target_, params) are skipped."""
        known = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in dict(node).items() if k in known})
        settings.validate()
        return settings

    def validate(self) -> None:
        if not importable("optuna"):
            raise ConfigError("hydra/sweeper=optuna needs Optuna, which is not installed. Install it with "
                              "`pip install 'cnnlab[search]'` (or `pip install optuna`), or drop hydra/sweeper=optuna "
                              "to run the sweep as a grid of comma lists.")
        check_range("hydra.sweeper.n_trials", self.n_trials, 1)
        check_choice("hydra.sweeper.sampler", self.sampler, SAMPLERS)
        check_choice("hydra.sweeper.metric", self.metric, METRICS)
        check_choice("hydra.sweeper.pruner", self.pruner, PRUNERS)
        check_range("hydra.sweeper.min_epochs", self.min_epochs, 1)
        check_range("hydra.sweeper.reduction_factor", self.reduction_factor, 2)
        check_range("hydra.sweeper.startup_trials", self.startup_trials, 0)
        if self.n_jobs is not None:
            check_range("hydra.sweeper.n_jobs", self.n_jobs, 1)
        natural = METRICS[self.metric][0]
        if self.direction not in (None, natural):
            check_choice("hydra.sweeper.direction", self.direction, ("maximize", "minimize", None))
            raise ConfigError(f"hydra.sweeper.direction={self.direction} would search for the worst "
                              f"{self.metric}, which is {natural}d; leave direction null (it follows the metric)")
        if self.sampler == "cmaes" and not importable("cmaes"):
            raise ConfigError("hydra.sweeper.sampler=cmaes needs the cmaes package, which is not installed: "
                              "`pip install cmaes`, or choose tpe, random or grid")

    @property
    def maximize(self) -> bool:
        return METRICS[self.metric][0] == "maximize"

    @property
    def reports_best(self) -> bool:
        return METRICS[self.metric][1]

    def study_name_for(self, sweep_dir: Path) -> str:
        """study_name, else: "cnnlab" in the sweep dir's own journal (the file is the study's, wherever the
        directory is moved), the sweep dir's full path in a storage other sweeps may share."""
        if self.study_name:
            return self.study_name
        return "cnnlab" if self.storage is None else str(Path(sweep_dir).resolve())

    def signature(self) -> dict[str, Any]:
        """The settings that change which trials run and how they end: a continued study keeps them."""
        return {k: getattr(self, k) for k in ("sampler", "seed", "metric", "pruner", "min_epochs", "reduction_factor",
                                              "startup_trials")}


def make_storage(storage: str | None, sweep_dir: Path) -> Any:
    """The study's storage: a journal file (the sweep dir's own by default, or a path), or a database URL.

    A journal file is shared by every process that can see the file, so trials report to one study
    whether a launcher runs them here, in joblib's workers or on SLURM nodes of a shared file system."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if storage and "://" in storage:
        return RDBStorage(storage)
    path = Path(storage) if storage else Path(sweep_dir) / STUDY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_pruner(settings: SearchSettings, epochs: int) -> Any:
    """The pruner, counting in epochs: a trial is never pruned before min_epochs."""
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                           n_warmup_steps=settings.min_epochs)
    if settings.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.min_epochs,
                                                      reduction_factor=settings.reduction_factor)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.min_epochs, max_resource=max(epochs, settings.min_epochs),
                                              reduction_factor=settings.reduction_factor)
    return optuna.pruners.NopPruner()


def make_sampler(settings: SearchSettings, trial: int, grid: dict[str, list[Any]] | None = None) -> Any:
    """The sampler that proposes trial number `trial`. The sweeper makes one per trial, seeded from the
    study's seed and the trial's number, so the same command and history propose the same trials, also
    after a resume; the grid sampler keeps the study's seed (it shuffles the grid with it, then walks it)."""
    import numpy as np
    import optuna

    # a seed per (study seed, trial) from numpy's SeedSequence: the seeds of seed 1 are not those of seed 0
    # shifted by one trial, as seed + trial would make them
    seed = int(np.random.SeedSequence([settings.seed, trial]).generate_state(1)[0])
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=settings.seed)
    if settings.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)
