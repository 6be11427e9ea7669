"""A sweep run again in its directory, checked before any job runs.

Re-running a sweep's command in its hydra.sweep.dir goes on with it: finished jobs are kept, stopped ones
resume (job.py). A job finds its directory by name (rundir.job_dir_name), so a changed command, say
another model, would find the old sweep's runs under the same names and report them as its own. Here
each job that finds a run in its directory is compared with it, and the whole command is refused (exit
2, nothing run or written) when:
- the run was trained with another config, outside the keys a resume may change (resume.CHANGEABLE) and the
  sweep's name;
- the run has trained more epochs than this command's trainer.epochs;
- the run must go on (stopped, failed, or completed and now given more epochs) and its last checkpoint
  cannot be read;
- a file sits where the job's directory goes.
A completed job given more epochs is extended, as `trainer.resume=<its dir> trainer.epochs=N` would.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cnnlab.checkpoint import load_checkpoint
from cnnlab.checks import ConfigError, under
from cnnlab.record import Status, Summary, read_summary
from cnnlab.report.sweep import flat_params
from cnnlab.resume import CHANGEABLE
from cnnlab.rundir import holds_a_run, job_dir_name

MAX_SHOWN = 3  # jobs, and keys of one job, named in the message; the rest are counted
# besides what a resume may change (where the data lies among them: a cluster job may stage it elsewhere each time,
# often through ${oc.env:CNNLAB_DATA}), the name that names the sweep's directory
UNCOMPARED = (*CHANGEABLE, "name")


def check_rerun(sweep_dir: Path | None, jobs: Sequence[list[str]], varying: list[str] | None,
                config_of: Callable[[int], dict[str, Any]]) -> None:
    """ConfigError where this sweep's jobs do not match the runs their directories hold. varying: the keys that
    name its jobs' directories (rundir.job_dir_name); config_of(num): job num's validated config
    (RunConfig.to_dict), asked only for jobs that find a run."""
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    problems: list[tuple[str, bool]] = []  # what is wrong with a job, and whether it is a mismatch of the command
    for num, job in enumerate(jobs):
        path = sweep_dir / job_dir_name(num, job, varying)
        problem = _problem(path, lambda: config_of(num))
        if problem:
            problems.append((f"job {num} ({path.name}) {problem[0]}", problem[1]))
    if not problems:
        return
    more = f"; and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    hint = (f". Run the command that made that sweep to go on with it (a re-run may change only "
            f"{', '.join(c for c in CHANGEABLE if c != 'trainer.resume')}; a larger trainer.epochs extends its "
            f"completed jobs), or give this command its own directory with hydra.sweep.dir=<new dir>"
            if any(mismatch for _, mismatch in problems) else "")
    raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds a sweep that this command cannot go on with, so nothing "
                      f"was run: {'; '.join(text for text, _ in problems[:MAX_SHOWN])}{more}{hint}")


def kept(summary: Summary, epochs: int) -> bool:
    """A job an earlier run of the sweep finished, which a re-run keeps as it is; a completed one that a larger
    trainer.epochs extends goes on (job.py resumes it, as trainer.resume would)."""
    extended = summary.status == Status.COMPLETED and epochs > (summary.epochs_completed or 0)
    return summary.finished and not extended


def _problem(path: Path, config: Callable[[], dict[str, Any]]) -> tuple[str, bool] | None:
    """What keeps the job from going on in its directory, and whether the command is what differs."""
    if path.exists() and not path.is_dir():
        return f"finds a file where its directory goes: move {path} away", False
    if not holds_a_run(path):
        return None
    try:
        summary = read_summary(path)
    except (OSError, ValueError, TypeError):
        return None  # no record to compare with: the job itself says what it finds there
    new = config()
    if isinstance(summary.config, dict) and summary.config:
        changed = _changed(summary.config, new)
        if changed:
            more = f" (and {len(changed) - MAX_SHOWN} more keys)" if len(changed) > MAX_SHOWN else ""
            return f"was trained with {', '.join(changed[:MAX_SHOWN])}{more}", True
    epochs, done = new["trainer"]["epochs"], summary.epochs_completed or 0
    if done > epochs:
        return f"has trained {done} epochs, more than trainer.epochs={epochs}", True
    last = path / "checkpoints" / "last.pt"
    if kept(summary, epochs) or not last.exists():
        return None  # kept as it is; or, stopped before its first checkpoint, it starts over in place
    try:
        load_checkpoint(last)
    except ConfigError as err:
        reason = str(err).split("; it was not loaded")[0]
        return f"must go on from its last checkpoint, which cannot be read ({reason}): move {path} away to train it " \
               f"from its start", False
    return None


def _changed(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key=old, not new` for each key both configs hold that differs, outside the keys a resume may change
    (a key only one holds is a newer or older cnnlab's, as resume.resumed_config takes it)."""
    old, now = flat_params(json.loads(json.dumps(recorded))), flat_params(json.loads(json.dumps(new)))
    return [f"{key}={old[key]}, not {now[key]}" for key in old
            if key in now and old[key] != now[key] and not under(key, UNCOMPARED)]
