"""Reports: what one run writes into its directory (run.py) and the comparison across runs (sweep.py).

summary.json is not among them: the run record (cnnlab/record.py) alone writes it."""
from cnnlab.report.run import (METRIC_COLUMNS, append_metrics, console_table, per_class_text, plot_curves,
                               write_confusion)

__all__ = ["METRIC_COLUMNS", "append_metrics", "console_table", "per_class_text", "plot_curves", "write_confusion"]
