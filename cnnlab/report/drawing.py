"""Where a run's figures are drawn: at once, in this process (a lone run), or in child processes side by
side (the members of a fused group that end together).

Drawing is matplotlib's Python, bound to one core: the 12 members of the LeNet grid took 5.9 s one after
another for their confusion matrices and curves (2-core CPU; 8 members took 6 s on the H100 machine),
while the device sat idle. Side by side, up to one child Python process per core (`child` below: it
imports matplotlib and pandas, not torch) draws its share, given through a pipe. Not multiprocessing's
spawn: that imports the parent's main script again in each child, and a user's script without a
__main__ guard would start its sweep again there. The files are the same either way (the children take
this process's changed matplotlib settings). Where a child cannot start or dies, its figures are drawn
here. On 2 cores the grid's ends took 3.5 s instead of 4.2 s; a sweep report's four figures were slower
side by side there (2.5 s against 1.8 s: the children's start-up), so the report draws at once.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

Task = tuple[Callable[..., Any], tuple[Any, ...]]
# a child finds cnnlab where this process found it, installed or not (appended: it shadows nothing)
CHILD = (f"import sys; sys.path.append({str(Path(__file__).resolve().parents[2])!r}); "
         f"from cnnlab.report.drawing import child; child()")
HERE = object()  # a figure's outcome when its child failed: draw it in this process
MIN_FIGURES = 4  # a child's start-up (~0.5 s) is about two figures' drawing: one run's two draw at once


class Drawing:
    """One run's figures: each call draws one (fn(*args) writes its files), at once or in a batch;
    wait() returns once all are written, raising the first error, then calls what was to come after them."""

    def __init__(self, batch: Batch | None = None) -> None:
        self.batch = batch
        self.sent: list[int] = []  # the figures' places in the batch
        self.then: list[Task] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.batch is None:
            fn(*args)
        else:
            self.sent.append(self.batch.add(fn, args))

    def after(self, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args) once the figures sent so far are written: at once where they were drawn at once."""
        if self.batch is None:
            fn(*args)
        else:
            self.then.append((fn, args))

    def wait(self) -> None:
        sent, then, self.sent, self.then = self.sent, self.then, [], []
        if self.batch is not None:
            self.batch.draw()
        for index in sent:
            outcome = self.batch.outcomes[index]
            if outcome is HERE:
                fn, args = self.batch.tasks[index]
                fn(*args)
            elif isinstance(outcome, BaseException):
                raise outcome
        for fn, args in then:
            fn(*args)


class Batch:
    """The figures of several runs, drawn at the first wait by up to `children` processes side by side."""

    def __init__(self, children: int) -> None:
        self.children, self.tasks, self.outcomes = children, [], []

    def add(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> int:
        self.tasks.append((fn, args))
        return len(self.tasks) - 1

    def draw(self) -> None:
        """Every figure not yet drawn: its outcome None (written), the error it raised, or HERE."""
        if len(self.outcomes) == len(self.tasks):
            return
        start = len(self.outcomes)
        shares = [list(range(start + k, len(self.tasks), self.children)) for k in range(self.children)]
        shares = [share for share in shares if share]
        self.outcomes += [HERE] * (len(self.tasks) - start)
        with ThreadPoolExecutor(len(shares)) as threads:  # threads that wait on the children
            for share, outcomes in zip(shares, threads.map(self._child, shares)):
                for index, outcome in zip(share, outcomes or [HERE] * len(share)):
                    self.outcomes[index] = outcome

    def _child(self, share: list[int]) -> list[Any] | None:
        try:
            payload = pickle.dumps((_changed_settings(), [self.tasks[i] for i in share]))
        except Exception:  # noqa: BLE001 - an argument that does not pickle: drawn here
            return None
        try:
            done = subprocess.run([sys.executable, "-c", CHILD], input=payload, capture_output=True, check=True)
            outcomes = pickle.loads(done.stdout)  # from the child this process started, with its own tasks
        except Exception:  # noqa: BLE001 - it could not start, died, or wrote something else: drawn here
            return None
        return outcomes if isinstance(outcomes, list) and len(outcomes) == len(share) else None


@contextlib.contextmanager
def side_by_side(figures: int) -> Iterator[Callable[[], Drawing]]:
    """Drawings (one per run) whose `figures` figures in all are drawn by up to min(figures, cores) child
    processes at the first wait; fewer than MIN_FIGURES figures, or a single core, draw at once."""
    children = min(figures, os.cpu_count() or 1)
    batch = Batch(children) if children > 1 and figures >= MIN_FIGURES else None
    yield lambda: Drawing(batch)



def _changed_settings() -> dict[str, Any]:
    """matplotlib's settings this process changed (a notebook's style), for the children to draw alike."""
    defaults = matplotlib.rcParamsDefault
    return {k: v for k, v in matplotlib.rcParams.items()
            if not k.startswith("backend") and k in defaults and v != defaults[k]}


def child() -> None:
    """A child: draw the figures given on stdin; each one's outcome (None, or the error it raised) on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the run
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # stdout carries the outcomes alone
    settings, tasks = pickle.load(sys.stdin.buffer)  # from the parent process, which made them
    with contextlib.suppress(Exception):
        matplotlib.rcParams.update(settings)
    outcomes = []
    for fn, args in tasks:
        try:
            fn(*args)
            outcomes.append(None)
        except Exception as err:  # noqa: BLE001 - the parent raises it for the run whose figure it was
            outcomes.append(err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
    pickle.dump(outcomes, out)


def _picklable(err: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001
        return False
    return True
