"""Reports: what one run writes into its directory (run.py) and the comparison across runs (sweep.py).

summary.json is not among them: the run record (cnnlab/record.py) alone writes it."""
from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from cnnlab.checks import ConfigError
from cnnlab.report.run import (METRIC_COLUMNS, append_metrics, console_table, per_class_text, plot_curves,
                               write_confusion)

__all__ = ["METRIC_COLUMNS", "append_metrics", "console_table", "per_class_text", "plot_curves", "unless_it_fails",
           "write_confusion"]

T = TypeVar("T")


def unless_it_fails(what: str, make: Callable[[], T]) -> T | None:
    """make(), or None with "<what> not written" on stderr: a report written at the end of a sweep never
    costs the sweep its exit status (bad input is its one-line message; a bug, its traceback)."""
    try:
        return make()
    except ConfigError as err:
        print(f"{what} not written: {err}", file=sys.stderr)
    except Exception:
        print(f"{what} not written:", file=sys.stderr)
        traceback.print_exc()
    return None
