"""What job.run_job asks while the fused launcher runs a group through it.

The launcher runs each member's job twice through Hydra's run_job, with the app's own task function,
so each job gets its directory, config files, logging and outcome exactly as with Hydra's basic
launcher. The first time (joining) job.run_job opens the run and hands it to the session instead of
training it; the second time (training) the first job trains the whole group and each job returns its
own member's summary. A stop raises Interrupted from that job, so the app reports it as for any sweep.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig
from cnnlab.distributed import World
from cnnlab.fused.group import Member, open_member, train_group
from cnnlab.fused.settings import FusedSettings
from cnnlab.interrupt import GracefulStop, Interrupted
from cnnlab.record import RunRecord, Summary
from cnnlab.search.trial import EpochJudge

log = logging.getLogger("cnnlab")
_SESSION: ContextVar[Session | None] = ContextVar("cnnlab_fused_session", default=None)


class Session:
    """One group's members, joined one job at a time, then trained together once."""

    def __init__(self, settings: FusedSettings, stop: GracefulStop, reserved: float = 0.0) -> None:
        self.settings, self.stop = settings, stop
        self.members: dict[int, Member] = {}
        # what the members load once (the dataset read, its splits placed), and the device memory their data must
        # leave to the group's steps (fit.opened_run)
        self.shared: dict[str, Any] = {"reserved": reserved}
        self.training = False
        self._trained = False

    def join(self, num: int, run: RunConfig, run_dir: Path, overrides: list[str], record: RunRecord, world: World,
             judge: EpochJudge | None) -> None:
        if world.distributed:
            raise ConfigError("hydra/launcher=fused trains its groups in one process; it cannot run under torchrun")
        self.members[num] = open_member(f"job {num}", run, run_dir, overrides, record, world, judge, self.stop,
                                         self.shared)

    def result(self, num: int) -> Summary | None:
        """Job num's summary; the first call trains the group (Interrupted after a stop)."""
        if not self._trained:
            self._trained = True
            members = list(self.members.values())
            try:  # the jobs joined (a re-run's completed jobs are kept, not joined)
                train_group(members, self.settings.mode_on(members[0].state.device.type), list(self.members),
                            self.settings.cuda_graphs)
            except BaseException as err:  # what broke the group's steps ends every member still open
                for member in members:
                    if member.summary is None:
                        member.close(err)
                if not isinstance(err, Exception) or isinstance(err, Interrupted):
                    raise
                # as a sweep's job that fails: recorded (summary.json says failed), the other jobs go on
                log.exception("the fused group's training failed, and with it each of its jobs")
        return self.members[num].summary


def current() -> Session | None:
    return _SESSION.get()


@contextlib.contextmanager
def active(session: Session) -> Iterator[Session]:
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)

