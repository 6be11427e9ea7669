"""One Hydra job, and the checks before Hydra starts: what the `cnnlab` command line and the Python
API (api.py) share. The caller decides how outcomes reach the user: the CLI with exit statuses, the
API with exceptions and Run objects.
"""
from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, MutableMapping
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab import distributed
from cnnlab.build import prepare
from cnnlab.checks import ConfigError
from cnnlab.config import offer_registered_models, validate
from cnnlab.interrupt import GracefulStop, Interrupted
from cnnlab.launch import job_placement
from cnnlab.precheck import check_command_line, naming_keys
from cnnlab.record import RunRecord, Summary, read_summary
from cnnlab.report import console_table
from cnnlab.rerun import kept
from cnnlab.resume import resume_argv, resume_point, resumed_config
from cnnlab.plugins import register_plugins
from cnnlab.search.trial import trial_judge
from cnnlab.rundir import SWEEP_COMMAND_ENV, SWEEP_KEYS_ENV, holds_a_run, release
from cnnlab.fit import fit
from cnnlab.fused.session import Session, current as fused_session

log = logging.getLogger("cnnlab")


def run_job(cfg: DictConfig) -> Summary | None:
    """Train the job Hydra composed, in the run directory Hydra made.

    Raises Interrupted (checkpointed, resumable; in a sweep also after a job that a signal reached once its
    training was done, so that the next job does not start). A single run raises what refused or broke it (a
    ConfigError: bad input, with its directory removed when nothing had begun); a sweep's job records
    its failure in summary.json and returns None, so the other jobs run."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = fused_session()
    if group is not None and group.training:  # the fused launcher's second pass: the group trains, once
        return _group_result(group, hydra_cfg.job.num, run_dir)
    world = distributed.world_from_env()
    if not world.is_main:  # rank 0 speaks for the run; the others only warn
        log.setLevel(logging.WARNING)
    _warn_unswept_preset(hydra_cfg, multirun)
    if multirun and holds_a_run(run_dir):  # a sweep run again: each job goes on from where it stands
        kept = _finished_job(run_dir, int(cfg.trainer.epochs))
        if kept is not None:
            return kept
        cfg.trainer.resume = str(run_dir)
    record, stop = None, None  # the run's record, once its directory is known for sure; its signal catcher
    try:
        resume = cfg.trainer.get("resume")
        if resume:  # the checkpoint's config, changed only where this command line says
            point = resume_point(resume)
            cfg = resumed_config(cfg, point.saved_config(), overrides)
            cfg.trainer.resume, run_dir = str(resume), point.run_dir  # a sweep's re-run sets it, not its overrides
        run = validate(cfg)
        distributed.setup(world, run.trainer.device, multirun)
        run_dir = Path(distributed.broadcast(str(run_dir)))  # under torchrun: rank 0's run dir for every rank
        opener = RunRecord.for_resume if run.trainer.resume else RunRecord.new
        record = opener(run_dir, overrides, writes=world.is_main)
        judge = trial_judge(hydra_cfg.sweeper, Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, run_dir,
                            run.trainer.epochs) if multirun else None  # a search's trial: its pruner
        if group is not None:  # the fused launcher's first pass: the run is opened for its group, not trained
            group.join(hydra_cfg.job.num, run, run_dir, overrides, record, world, judge)
            return None
        with job_placement(cfg), GracefulStop() as stop:  # side by side: a share of the CPU threads, a GPU each
            summary = fit(run, run_dir, overrides, record, judge, stop)
    except Interrupted:  # checkpointed at a step boundary; summary.json says interrupted
        raise
    except Exception as err:
        _failed(err, run_dir, overrides, record, multirun, world)
        _stop_after(stop)  # a signal, then a failure it caused (a DataLoader's workers stopped by Ctrl-C)
        return None
    finally:
        distributed.teardown()
    log.info("%s", console_table(summary, run_dir))
    if multirun:
        _stop_after(stop)
    return summary


def _group_result(group: Session, num: int, run_dir: Path) -> Summary | None:
    """A fused group's member: its summary (the first member's call trains the group), None where it failed."""
    summary = group.result(num)
    failed = summary is None or summary.status == "failed"  # as a sweep's job that fails: recorded in summary.json
    if not failed:
        log.info("%s", console_table(summary, run_dir))
    _stop_after(group.stop)
    return None if failed else summary


def _stop_after(stop: GracefulStop | None) -> None:
    """A signal that came after a sweep job's training (its test score, its plots) did not stop the job, which
    ended as it would have; it stops the sweep before its next job, as a signal during training would."""
    if stop is not None and stop.requested():
        raise Interrupted(stop.signum, finished=True)


def _failed(err: Exception, run_dir: Path, overrides: list[str], record: RunRecord | None, multirun: bool,
            world: distributed.World) -> None:
    """Record a failure; re-raise it for a single run, log it for a sweep's job."""
    if not multirun and (record is None or not record.live) and world.is_main:
        release(run_dir)  # refused before the run began: no directory is left behind
    else:  # fit() has recorded its own failure; a sweep job's earlier one is recorded for the report
        (record or RunRecord.new(run_dir, overrides, writes=world.is_main)).failed(err)
    if not multirun:
        raise err
    if isinstance(err, ConfigError):
        # bad input: one clear message; the traceback only when debugging (Hydra's own switch)
        log.error("%s", err, exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
    else:
        log.exception("job failed")


def _warn_unswept_preset(hydra_cfg: DictConfig, multirun: bool) -> None:
    sweep = hydra_cfg.sweeper.get("params")
    if sweep and not multirun:  # a study preset run without -m: say what is being left out
        axes = ", ".join(f"{key}={values}" for key, values in sweep.items())
        log.warning("this config defines a sweep (%s) but runs once with its base settings; add -m to run the sweep", axes)


def _finished_job(run_dir: Path, epochs: int) -> Summary | None:
    """A job an earlier run of this sweep finished: kept as it is, not one file touched (so not logged:
    the job's log is its train.log); None where it goes on (a completed job given more epochs is extended)."""
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError, TypeError):
        return None
    if not kept(summary, epochs):
        return None
    print(f"{run_dir.name}: {summary.status} in an earlier run of this sweep; kept as it is")
    return summary


def continue_command(run_dir: Path, multirun: bool, program: str = "python -m cnnlab") -> str:
    """How to go on: the sweep's own command line in its directory, or trainer.resume for one run."""
    if multirun and os.environ.get(SWEEP_COMMAND_ENV):
        sweep_dir = HydraConfig.get().sweep.dir
        args = [a for a in shlex.split(os.environ[SWEEP_COMMAND_ENV]) if not a.startswith("hydra.sweep.dir=")]
        return " ".join([program, *map(shlex.quote, args), f"hydra.sweep.dir={shlex.quote(str(sweep_dir))}"])
    return f"{program} trainer.resume={shlex.quote(str(run_dir.resolve()))}"


def _job_check(argv: list[str]) -> Callable[[DictConfig], None]:
    """What checking a job means before Hydra starts: its overrides compose (a resume: only that, its
    config comes from the checkpoint), it validates, and in a sweep its model and pipeline build
    (a single run builds them in fit, before it begins)."""
    resume = any(a.startswith("trainer.resume=") for a in argv)
    sweep = "-m" in argv or "--multirun" in argv

    def check(cfg: DictConfig) -> None:
        if not resume:
            run = validate(cfg)
            if sweep:
                prepare(run)

    return check


def checked_command_line(argv: list[str], env: MutableMapping[str, str]) -> list[str]:
    """The command line with trainer.resume made safe, every job composed and checked (ConfigError
    otherwise); for a sweep, `env` gets what its jobs' directories and its stop message need."""
    offer_registered_models(argv)  # `model=<name>` for models registered in Python
    register_plugins()  # hydra/sweeper=optuna and hydra/launcher=fused, whatever kind of install this is
    given, argv = argv, resume_argv(argv)
    jobs = check_command_line(argv, _job_check(argv))  # every job composed and checked before anything runs
    keys = naming_keys(jobs)
    if keys is not None:  # for the sweep's jobs, in whatever process a launcher runs them
        env[SWEEP_KEYS_ENV] = ",".join(keys)  # job directories are named by what varies
        env[SWEEP_COMMAND_ENV] = shlex.join(given)  # what a stopped sweep is re-run with
    return argv
