"""`python -m cnnlab [overrides]` and the `cnnlab` console script: compose, validate, fit."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab import distributed
from cnnlab.build import prepare
from cnnlab.checks import ConfigError
from cnnlab.config import config_dir, validate
from cnnlab.interrupt import Interrupted
from cnnlab.launch import job_placement, missing_launcher_message
from cnnlab.precheck import check_command_line
from cnnlab.record import RunRecord
from cnnlab.report import console_table
from cnnlab.resume import resume_argv, resume_point, resumed_config
from cnnlab.rundir import release
from cnnlab.train import fit

log = logging.getLogger("cnnlab")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    world = distributed.world_from_env()
    if not world.is_main:  # rank 0 speaks for the run; the others only warn
        log.setLevel(logging.WARNING)
    sweep = hydra_cfg.sweeper.get("params")
    if sweep and not multirun:  # a study preset run without -m: say what is being left out
        axes = ", ".join(f"{key}={values}" for key, values in sweep.items())
        log.warning("this config defines a sweep (%s) but runs once with its base settings; add -m to run the sweep", axes)
    record = None  # the run's record, once its directory is known for sure
    try:
        if cfg.trainer.get("resume"):  # the checkpoint's config, changed only where this command line says
            point = resume_point(cfg.trainer.resume)
            cfg = resumed_config(cfg, point.saved_config(), overrides)
            run_dir = point.run_dir
        run = validate(cfg)
        distributed.setup(world, run.trainer.device, multirun)
        run_dir = Path(distributed.broadcast(str(run_dir)))  # under torchrun: rank 0's run dir for every rank
        opener = RunRecord.for_resume if run.trainer.resume else RunRecord.new
        record = opener(run_dir, overrides, writes=world.is_main)
        with job_placement(cfg):  # jobs side by side: a share of the CPU threads, a GPU each
            summary = fit(run, run_dir, overrides, record)
    except Interrupted as err:  # checkpointed at a step boundary; status: interrupted is in summary.json
        log.warning("%s: checkpoint saved. Continue with: %s trainer.resume=%s", err,
                    distributed.command_prefix(world), run_dir.resolve())
        sys.exit(err.exit_code)
    except Exception as err:
        if not multirun and (record is None or not record.live) and world.is_main:
            release(run_dir)  # refused before the run began: no directory is left behind
        else:  # fit() has recorded its own failure; a sweep job's earlier one is recorded for the report
            (record or RunRecord.new(run_dir, overrides, writes=world.is_main)).failed(err)
        if isinstance(err, ConfigError):
            # bad input: one clear message; the traceback only when debugging (Hydra's own switch)
            log.error("%s", err, exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
        elif multirun:
            log.exception("job failed")
        else:
            raise  # a bug, not bad input: keep the traceback
        if multirun:
            return None  # recorded in summary.json; the other jobs run, SweepStatus reports it
        sys.exit(2)
    finally:
        distributed.teardown()
    log.info("%s", console_table(summary, run_dir))
    return summary.best_val_acc  # the value a sweeper would optimise


# subcommand -> the module whose main(argv) -> exit status runs it; imported only when named,
# so training and `cnnlab --help` never load what the subcommands need (pandas, ...)
SUBCOMMANDS = {
    "models": "cnnlab.models.__main__",
    "report": "cnnlab.report.__main__",
    "evaluate": "cnnlab.evaluate",
    "predict": "cnnlab.predict",
}


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


def main() -> None:
    """`cnnlab [overrides]` trains; `cnnlab models ...` lists the model zoo; `cnnlab report DIR` compares runs;
    `cnnlab evaluate run=DIR` scores a checkpoint on a test set; `cnnlab predict run=DIR images=...` classifies images."""
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    message = missing_launcher_message(sys.argv[1:])
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)
    try:
        argv = resume_argv(sys.argv[1:])
        check_command_line(argv, _job_check(argv))  # every job composed and checked before anything runs
        sys.argv[1:] = distributed.rank_argv(argv, distributed.world_from_env())
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the traceback, when debugging
            traceback.print_exc()
        print(err, file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
