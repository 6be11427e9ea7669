"""The sweeper's loop: ask the study for trials, launch them as ordinary sweep jobs, tell it how each ended.

Every trial is a normal cnnlab run in the sweep dir, named and numbered as a grid's job is (trial N is
job N). The study lives in the sweep dir too (a journal file), so running the same command into the
same hydra.sweep.dir continues it: finished trials are kept, a trial a stopped sweep left running is
resumed from its checkpoint (or retried with its parameters when it never began), and new trials are
asked for until the study holds n_trials. How a run ended becomes the trial's state:

    completed                   COMPLETE, with the metric from its summary.json
    pruned, stuck, diverged     PRUNED: stopped early, ranked by the epochs it reported
    failed, killed, no summary  FAIL: the study goes on without it
    interrupted                 left running: the next run of the command resumes it
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.checks import ConfigError
from cnnlab.record import Status, is_live, read_summary
from cnnlab.rundir import UNNAMED
from cnnlab.search.settings import SearchSettings, make_sampler
from cnnlab.search.space import SearchSpace
from cnnlab.search.trial import open_study, trial_of

log = logging.getLogger("cnnlab")

# launch(list of each trial's overrides, number of the first) -> each job's run dir (None when unknown)
Launch = Callable[[Sequence[Sequence[str]], int], list[Path | None]]
PRUNED_STATUSES = (Status.PRUNED, Status.STUCK, Status.DIVERGED)
AWAIT_SECONDS = 5.0  # how often a trial another process trains is looked at
SIGNATURE = "cnnlab_search"  # the study's user attr: what it searches, to refuse a re-run that searches else


@dataclass
class Search:
    settings: SearchSettings
    space: SearchSpace
    sweep_dir: Path
    epochs: int  # trainer.epochs of the trials: the pruners' full budget

    def run(self, launch: Launch, batch: int, opened: Callable[[], None] | None = None) -> None:
        """Continue the study in the sweep dir (or start it) until it holds n_trials trials; `opened` is
        called once the study is known to be this command's (the sweeper saves multirun.yaml then)."""
        grid = self.space.grid() if self.settings.sampler == "grid" else None
        study = open_study(self.settings, self.sweep_dir, self.epochs, create=True)
        self._check_signature(study)
        if opened:
            opened()
        stale, elsewhere = self._stale(study)
        for numbers in _contiguous(stale):  # a stopped sweep's trials first, with their own values
            if not self._launch(study, numbers, launch):
                return
        limit = self.settings.n_trials if grid is None else min(self.settings.n_trials, math.prod(map(len, grid.values())))
        if limit < self.settings.n_trials:
            log.info("the grid holds %d points, so the search ends there (hydra.sweeper.n_trials=%d)", limit,
                     self.settings.n_trials)
        while (left := self._left(study, limit)) > 0:
            numbers = [self._ask(study, grid) for _ in range(min(batch, left))]
            for run in _contiguous(numbers):  # contiguous unless another process asks from this study too
                if not self._launch(study, run, launch):
                    return
        self._await(study, elsewhere)
        log.info("the study holds %d trials (hydra.sweeper.n_trials=%d)", len(study.trials), self.settings.n_trials)

    def _check_signature(self, study: Any) -> None:
        # settings that change no result (device, paths, progress, trackers) may differ between runs of the command
        fixed = sorted(o for o in self.space.fixed
                       if not any(o.lstrip("+~").startswith((u + "=", u + ".")) for u in UNNAMED))
        signature = {"search": self.space.describe(), "fixed": fixed, "sweeper": self.settings.signature()}
        saved = study.user_attrs.get(SIGNATURE)
        if saved is None:
            study.set_user_attr(SIGNATURE, signature)
        elif saved != signature:
            changed = "; ".join(f"{k} was {_shown(saved.get(k))}, now {_shown(signature[k])}"
                                for k in signature if signature[k] != saved.get(k))
            raise ConfigError(
                f"{self.sweep_dir} holds a study that another search started ({changed}); a study continues only "
                f"with the command that started it (n_trials, n_jobs, the launcher and the device may change). "
                f"Give this search its own directory: leave hydra.sweep.dir out, or name it.")

    def _left(self, study: Any, limit: int) -> int:
        import optuna

        return limit - len(study.get_trials(deepcopy=False, states=(
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
            optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)))

    def _ask(self, study: Any, grid: dict[str, list[Any]] | None) -> int:
        # a sampler seeded for this trial: the same history proposes the same values, in any process
        study.sampler = make_sampler(self.settings, len(study.trials), grid)
        trial = study.ask({p.name: p.distribution() for p in self.space.params})
        return int(trial.number)

    def _stale(self, study: Any) -> tuple[list[int], dict[int, Path]]:
        """Trials left running by a sweep that stopped: those no process trains (to resume or retry),
        and those still training elsewhere (a SLURM job the stopped sweep left), by number."""
        import optuna

        stale, elsewhere = [], {}
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            run_dir = trial.user_attrs.get("run_dir")
            if run_dir and Path(run_dir).is_dir() and is_live(Path(run_dir)):
                elsewhere[trial.number] = Path(run_dir)  # told when it ends, before this sweep does
                continue
            state = outcome(Path(run_dir), self.settings.metric)[0] if run_dir else None
            if state in ("COMPLETE", "PRUNED"):  # it ended before the sweeper could tell the study: told now
                self._tell(study, trial.number, Path(run_dir))
            else:  # never began, interrupted, killed, or failed while the sweeper was gone: run it again
                stale.append(trial.number)
        if stale:
            log.info("resuming %d trial(s) a stopped run of this sweep left unfinished: %s", len(stale),
                     ", ".join(map(str, stale)))
        return stale, elsewhere

    def _await(self, study: Any, elsewhere: dict[int, Path]) -> None:
        """Wait for the trials other processes still train, then tell the study how they ended."""
        for number, run_dir in elsewhere.items():
            log.info("waiting for trial %d, which another process trains in %s", number, run_dir)
            while is_live(run_dir):
                time.sleep(AWAIT_SECONDS)
            self._tell(study, number, run_dir)

    def _launch(self, study: Any, numbers: list[int], launch: Launch) -> bool:
        """Run these trials (consecutive numbers) and tell the study how each ended; False when one was
        interrupted, so the sweep stops asking (the next run of the command resumes it)."""
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        try:
            run_dirs = launch([self.space.trial_overrides(trials[n].params) for n in numbers], numbers[0])
        except Exception as err:  # a killed worker (joblib) or an array job lost on SLURM: its trials, not the study
            log.error("the launcher lost trials %s: %s; each is recorded from its run directory", numbers, err)
            run_dirs = [None] * len(numbers)
        going_on = True
        for number, run_dir in zip(numbers, run_dirs):
            run_dir = run_dir or _recorded_dir(study, number)
            if run_dir is not None and run_dir.is_dir() and is_live(run_dir):
                self._await(study, {number: run_dir})  # the launcher gave up on it, the run did not
            elif run_dir is None:  # the launcher never got it as far as a run directory
                _tell(study, number, "FAIL", None)
            elif not self._tell(study, number, run_dir):
                going_on = False
        return going_on

    def _tell(self, study: Any, number: int, run_dir: Path) -> bool:
        """Tell the study how trial `number` ended, from its run dir; False while it has not ended."""
        state, value, status = outcome(run_dir, self.settings.metric)
        if state is None:
            return False
        _tell(study, number, state, value, {"status": status, "run_dir": str(Path(run_dir).resolve())})
        return True


def outcome(run_dir: Path, metric: str) -> tuple[str | None, float | None, str]:
    """(Optuna state name or None while it has not ended, the metric's value, the run's status)."""
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError, TypeError):
        return "FAIL", None, "failed"  # never wrote its record: broken before it began
    status = str(summary.status)
    if status == Status.COMPLETED:
        value = getattr(summary, metric, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return "COMPLETE", float(value), status
        log.error("%s completed without a %s (no validation split?): its trial is recorded as failed",
                  Path(run_dir).name, metric)
        return "FAIL", None, status
    if status in PRUNED_STATUSES:
        return "PRUNED", None, status
    if status in (Status.INTERRUPTED, Status.RUNNING):
        return None, None, status
    return "FAIL", None, status  # failed, killed


def _recorded_dir(study: Any, number: int) -> Path | None:
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    run_dir = trial.user_attrs.get("run_dir") if trial else None
    return Path(run_dir) if run_dir else None


def _tell(study: Any, number: int, state: str, value: float | None, attrs: dict[str, str] | None = None) -> None:
    import optuna

    # telling needs no sampler (each trial is asked with its own); the grid sampler's would call
    # study.stop() once the grid is done, which only study.optimize() allows
    study.sampler = optuna.samplers.RandomSampler()
    trial = trial_of(study, number)
    for key, text in (attrs or {}).items():  # before the trial is finished: then it can no longer change
        trial.set_user_attr(key, text)
    study.tell(number, value if state == "COMPLETE" else None, state=optuna.trial.TrialState[state])


def _contiguous(numbers: list[int]) -> list[list[int]]:
    """[3, 4, 7] -> [[3, 4], [7]]: a launcher numbers a batch's jobs from its first one."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
