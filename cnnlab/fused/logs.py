"""Each member's console lines in its own train.log while a group trains in one process.

Hydra gives each job a train.log through the root logger's file handler, one job at a time. A fused
group logs for all its members at once, so while it trains the root's file handlers step aside and
a router sends each record to the train.log of the member it is about (all of them when it is
about the group), and the console tags each line with its job.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


def job_log_files() -> list[tuple[str, logging.Formatter | None]]:
    """The files Hydra's logging set-up writes the current job's log to, with their formats."""
    return [(h.baseFilename, h.formatter) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


class MemberLogs(logging.Handler):
    """Routes each record to the current member's files, or to every member's when none is current."""

    def __init__(self, files: Sequence[Sequence[tuple[str, logging.Formatter | None]]], tags: Sequence[str]) -> None:
        super().__init__()
        self.files = [[self._open(path, fmt) for path, fmt in member] for member in files]
        self.tags = list(tags)
        self.current: int | None = None

    @staticmethod
    def _open(path: str, fmt: logging.Formatter | None) -> logging.FileHandler:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(fmt)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        members = range(len(self.files)) if self.current is None else (self.current,)
        for index in members:
            for handler in self.files[index]:
                if record.levelno >= handler.level:
                    handler.handle(record)

    @contextlib.contextmanager
    def about(self, index: int) -> Iterator[None]:
        """What is logged inside is about member `index`: its train.log, its tag on the console."""
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before

    def tag(self) -> str:
        return "fused group" if self.current is None else self.tags[self.current]

    def close(self) -> None:
        for member in self.files:
            for handler in member:
                handler.close()
        super().close()


class _Tagged(logging.Formatter):
    def __init__(self, inner: logging.Formatter, router: MemberLogs) -> None:
        super().__init__()
        self.inner, self.router = inner, router

    def format(self, record: logging.LogRecord) -> str:
        return f"[{self.router.tag()}] {self.inner.format(record)}"


@contextlib.contextmanager
def routed(router: MemberLogs) -> Iterator[MemberLogs]:
    """The root logger's files replaced by the router, its console lines tagged, for the block's length."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    consoles = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    formats = [h.formatter for h in consoles]
    for handler in files:
        root.removeHandler(handler)
    for handler in consoles:
        handler.setFormatter(_Tagged(handler.formatter or logging.Formatter(), router))
    root.addHandler(router)
    try:
        yield router
    finally:
        root.removeHandler(router)
        router.close()
        for handler, fmt in zip(consoles, formats):
            handler.setFormatter(fmt)
        for handler in files:
            root.addHandler(handler)
