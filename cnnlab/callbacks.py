"""Hydra callbacks registered in conf/config.yaml: output-directory check, end-of-sweep status."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def job_statuses(sweep_dir: Path) -> list[dict[str, Any]]:
    """summary.json of every job directory in a sweep, in job order."""
    def job_number(path: Path) -> tuple[int, str]:
        head = path.parent.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else sys.maxsize, path.parent.name)

    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=job_number):
        summary = json.loads(path.read_text())
        rows.append({"job": path.parent.name, **summary})
    return rows


class SweepStatus(Callback):
    """After a multirun: one line per job, and exit status 1 if any job failed.

    Jobs record their own failures in summary.json and return normally, so one bad job
    never stops the rest of a sweep; this is where the sweep as a whole reports them.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_statuses(sweep_dir)
        # print, not logging: after the jobs, the root logger still writes to the last job's log
        print(f"\nsweep {sweep_dir.resolve()}: {len(rows)} jobs")
        for row in rows:
            acc = row.get("test_acc")
            detail = f"test_acc {acc:.4f}" if isinstance(acc, (int, float)) else row.get("error", "")
            print(f"  {row.get('status', '?'):<11} {row['job']}  {detail}")
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


def unwritable_reason(path: Path) -> str | None:
    """Why `path` cannot be created or written to, or None if it can."""
    probe = path.absolute()
    while not probe.exists():  # the nearest existing ancestor decides
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


class OutputDirCheck(Callback):
    """Before Hydra creates the run (or sweep) directory: a clear message instead of a traceback."""

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        path = Path(str(OmegaConf.select(config, key)))
        reason = unwritable_reason(path)
        if reason:
            print(f"{key}={path} cannot be created: {reason}. Run from a directory you can write to, "
                  f"or choose another location with {key}=<dir>.", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
