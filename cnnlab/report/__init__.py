"""Reports: what one run writes into its directory (run.py) and the comparison across runs (sweep.py)."""
from cnnlab.report.run import (
    METRIC_COLUMNS, append_metrics, console_table, plot_curves, write_confusion, write_summary,
)

__all__ = ["METRIC_COLUMNS", "append_metrics", "console_table", "plot_curves", "write_confusion", "write_summary"]
