"""Ctrl-C and SIGTERM (cluster preemption) stop a run at the next step boundary, checkpointed."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger("cnnlab")


class Interrupted(Exception):
    """Raised by fit() after it saved the interrupt checkpoint and wrote status: interrupted; or, with
    finished, by a sweep's job that a signal reached after its training (job.py): the job ended (completed,
    or failed in its test score), and the sweep stops before its next one."""

    def __init__(self, signum: int, finished: bool = False) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} came after this job's training, so the job ended as its summary.json says; the "
                         f"sweep stops before its next job" if finished else f"interrupted by {name}")
        self.signum, self.finished = signum, finished

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class GracefulStop:
    """While active, SIGINT/SIGTERM only set `signum`; training checks it after every step.

    A second Ctrl-C aborts at once (KeyboardInterrupt) for a user who will not wait for the
    checkpoint. Outside the main thread (some launchers) signals cannot be caught: no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step, then stopping (Ctrl-C again aborts at once)",
                    signal.Signals(signum).name)
