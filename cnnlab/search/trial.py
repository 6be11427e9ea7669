"""A trial's side of the search: the job reports each epoch's validation metric to the study and
stops when the pruner says so.

The sweeper runs trial N as job number N of the sweep (hydra.job.num), so a job knows its trial
without anything added to its overrides; it opens the study through the storage named in its own
hydra.sweeper config, in whatever process or machine the launcher runs it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnlab.search.settings import SWEEPER_TARGET, SearchSettings, make_pruner, make_storage

log = logging.getLogger("cnnlab")

# fit's hook: (epoch, {"val_acc", "val_loss", "best_val_acc"}) -> True when the run should stop here
EpochJudge = Callable[[int, dict[str, float]], bool]


def open_study(settings: SearchSettings, sweep_dir: Path, epochs: int, create: bool = False) -> Any:
    """The sweep's study: created by the sweeper (create=True), loaded by its trials and the report.
    Its sampler samples nothing: the sweeper gives it one per trial when it asks (study.py)."""
    import optuna

    storage = make_storage(settings.storage, sweep_dir)
    name = settings.study_name_for(sweep_dir)
    pruner = make_pruner(settings, epochs)
    sampler = optuna.samplers.RandomSampler()
    if create:
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                   direction="maximize" if settings.maximize else "minimize", load_if_exists=True)
    return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)


def trial_of(study: Any, number: int) -> Any:
    """The live optuna Trial with this number, in this process (its reports go to the shared storage)."""
    import optuna

    # the storage maps a study's trial number to its id; Trial(study, id) is Optuna's own constructor
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, trial_id)


def trial_judge(sweeper: Any, sweep_dir: Path, number: int, run_dir: Path, epochs: int) -> EpochJudge | None:
    """For a job of an Optuna sweep: the judge fit() calls after every epoch; None for any other job."""
    if sweeper.get("_target_") != SWEEPER_TARGET:
        return None
    settings = SearchSettings.from_config(sweeper)
    trial = trial_of(open_study(settings, sweep_dir, epochs), number)
    trial.set_user_attr("run_dir", str(Path(run_dir).resolve()))  # where the sweeper finds its result, whatever happens
    key = "best_val_acc" if settings.reports_best else settings.metric.removeprefix("final_")

    def judge(epoch: int, metrics: dict[str, float]) -> bool:
        trial.report(float(metrics[key]), step=epoch)
        if epoch < epochs and trial.should_prune():  # after the last epoch there is nothing left to save
            log.warning("trial %d pruned after epoch %d: its %s (%.4f) is behind the study's other trials at this epoch",
                        number, epoch, key, metrics[key])
            return True
        return False

    return judge
