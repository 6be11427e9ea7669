"""Hydra callbacks registered in conf/config.yaml: output-directory check, end-of-sweep status."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, Refused, unwritable_reason
from cnnlab.rundir import holds_a_run, note_new
from cnnlab.search.settings import SWEEPER_TARGET


class SweepStatus(Callback):
    """After a multirun: the comparison report, one line per job, and exit status 1 if any job failed.

    Jobs record their own failures in summary.json and return normally, so one bad job never
    stops the rest of a sweep; this is where the sweep as a whole reports them. The report is
    written first, so failed and diverged jobs appear in it with their status.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from cnnlab.report.sweep import find_runs, load_runs  # pandas loads only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            runs = load_runs(find_runs([sweep_dir]))
        except ConfigError:  # no job got as far as writing its summary
            runs = []
        # print, not logging: after the jobs, the root logger still writes to the last job's log
        print(f"\nsweep {sweep_dir.resolve()}: {len(runs)} jobs")
        for run in runs:
            acc = run.summary.test_acc
            detail = f"test_acc {acc:.4f}" if isinstance(acc, (int, float)) else (run.summary.error or "")
            print(f"  {run.status:<11} {run.name}  {detail}")
        if runs:
            write_sweep_report(sweep_dir, config)
        if OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER_TARGET:
            from cnnlab.report.search import print_search_findings  # Optuna loads only when a search ends

            print_search_findings(sweep_dir, config.hydra.sweeper, int(OmegaConf.select(config, "trainer.epochs")))
        failed = [run.name for run in runs if run.status in ("failed", "killed", "unreadable")]
        if failed:
            print(f"{len(failed)} of {len(runs)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


def write_sweep_report(sweep_dir: Path, config: DictConfig) -> None:
    """The comparison report into the sweep dir; a problem with it never hides the jobs' own status."""
    from cnnlab.report import unless_it_fails
    from cnnlab.report.compare import write_report  # matplotlib and pandas load only when a sweep ends

    report = unless_it_fails("sweep report", lambda: write_report(
        [sweep_dir], sweep_dir, metric=str(OmegaConf.select(config, "report.metric", default="test_acc")),
        facet=list(OmegaConf.select(config, "report.facet", default=[]))))
    if report is None:
        return
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {(sweep_dir / 'sweep_summary.md').resolve()}")


class OutputDirCheck(Callback):
    """Before Hydra creates the run (or sweep) directory: a clear message instead of a traceback."""

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        path = Path(str(OmegaConf.select(config, key)))
        reason = unwritable_reason(path)
        if not reason:
            try:  # permissions can look fine where nothing can be made (/proc, a read-only mount)
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                reason = err.strerror or str(err)
        if reason:
            raise Refused(f"{key}={path} cannot be created: {reason}. Run from a directory you can write to, "
                          f"or choose another location with {key}=<dir>.")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        note_new(run_dir)  # a run refused before it begins removes what it made, and only that
        self._check(config, "hydra.run.dir")
        if not OmegaConf.select(config, "trainer.resume", default=None) and holds_a_run(run_dir):
            # before Hydra writes its config and log there: the run in it stays as it was
            raise Refused(f"hydra.run.dir={run_dir} already holds a run; a new run never writes into it. Continue that "
                          f"run with trainer.resume={run_dir}, or give the new one its own directory (leave "
                          f"hydra.run.dir out for a fresh one under outputs/runs/).")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
