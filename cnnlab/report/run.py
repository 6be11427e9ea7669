"""What a run writes into its directory: metrics, summary, confusion matrix and plots."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# Figures are made with matplotlib's object API, never pyplot: no backend is chosen or changed, so the
# files are written headless (servers, CI) and a notebook's own inline plotting is left as it was.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

if TYPE_CHECKING:  # not imported at run time: worker processes that draw figures (report/drawing.py) start without torch
    from cnnlab.record import Summary

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second",
)
TEST_COLUMNS = ("test_loss", "test_acc")  # with trainer.test_every_epoch: the test set after every epoch


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one epoch to metrics.csv, flushed at once so a crashed run keeps its history."""
    path = run_dir / "metrics.csv"
    new = not path.exists()
    if new:
        columns = METRIC_COLUMNS + (TEST_COLUMNS if "test_acc" in row else ())
    else:  # the header a run began with: a resume that turns test_every_epoch on or off keeps it
        with path.open(newline="") as f:
            columns = tuple(next(csv.reader(f), METRIC_COLUMNS))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})


def write_confusion(run_dir: Path, matrix: np.ndarray, classes: Sequence[str]) -> None:
    """confusion_matrix.csv/.png (rows: true class, columns: predicted) and per_class_accuracy.csv."""
    frame = pd.DataFrame(matrix, index=pd.Index(classes, name="true"), columns=list(classes))
    frame.to_csv(run_dir / "confusion_matrix.csv")

    totals = matrix.sum(axis=1)
    correct = np.diag(matrix)
    per_class = pd.DataFrame(
        {
            "class": list(classes),
            "correct": correct,
            "total": totals,
            "accuracy": np.divide(correct, totals, out=np.zeros(len(classes)), where=totals > 0),
        }
    )
    per_class.to_csv(run_dir / "per_class_accuracy.csv", index=False)
    confused_pairs(matrix, classes).to_csv(run_dir / "confused_pairs.csv", index=False)
    confusion_figure(matrix, classes).savefig(run_dir / "confusion_matrix.png", dpi=120)


def per_class_text(matrix: np.ndarray, classes: Sequence[str], shown: int = 20) -> str:
    """"Accuracy of plane: 79.0% (790/1000)" per class; beyond `shown` classes the worst and best ten."""
    totals, correct = matrix.sum(axis=1), np.diag(matrix)
    rates = np.divide(correct, totals, out=np.zeros(len(classes)), where=totals > 0)
    order = list(range(len(classes)))
    if len(classes) > shown:  # 100 classes: the ends of the ranking say the most
        ranked = sorted(order, key=lambda i: rates[i])
        order = ranked[: shown // 2] + ranked[-(shown // 2):]
    width = max(len(str(classes[i])) for i in order)
    head = "per-class test accuracy" + (f" (worst and best {shown // 2} of {len(classes)})" if len(order) < len(classes) else "")
    return "\n".join([head + ":"] + [f"  {str(classes[i]):<{width}}  {rates[i]:7.2%}  ({correct[i]}/{totals[i]})"
                                     for i in order])


def confused_pairs(matrix: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Every (true, predicted) pair of different classes that occurred, most frequent first."""
    true, predicted = np.nonzero(matrix * (1 - np.eye(len(classes), dtype=matrix.dtype)))
    totals = matrix.sum(axis=1)
    frame = pd.DataFrame({"true": [classes[i] for i in true], "predicted": [classes[j] for j in predicted],
                          "count": matrix[true, predicted],
                          "fraction_of_true": matrix[true, predicted] / np.maximum(totals[true], 1)})
    return frame.sort_values(["count", "true"], ascending=[False, True], kind="stable").reset_index(drop=True)


GRID_CLASSES = 30  # above this a class-by-class grid cannot be read: the most-confused pairs are drawn instead


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """The confusion matrix drawn: rows true class, columns predicted, coloured by row rate; with more than
    GRID_CLASSES classes, the most-confused pairs as bars instead."""
    if len(classes) > GRID_CLASSES:
        return _pairs_figure(matrix, classes)
    totals, correct = matrix.sum(axis=1), np.diag(matrix)
    k = len(classes)
    size = min(max(6, 0.45 * k), 30)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    rates = matrix / np.maximum(totals[:, None], 1)  # colour by row rate, so rare classes stay visible
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 45, ha="right" if k <= 10 else "center")
    ax.set_yticks(range(k), classes)
    ax.tick_params(labelsize=max(4, 10 - k // 15))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:  # counts are readable only for small matrices
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"Test confusion matrix ({int(matrix.sum())} images, accuracy {correct.sum() / max(matrix.sum(), 1):.2%})")
    fig.tight_layout()
    return fig


def _pairs_figure(matrix: np.ndarray, classes: Sequence[str], shown: int = 30) -> Figure:
    pairs = confused_pairs(matrix, classes).head(shown)
    fig = Figure(figsize=(9, 1.5 + 0.3 * max(len(pairs), 1)))
    ax = fig.subplots()
    y = np.arange(len(pairs))[::-1]
    ax.barh(y, pairs["count"], color="tab:red")
    ax.set_yticks(y, [f"{t} → {p}" for t, p in zip(pairs["true"], pairs["predicted"])], fontsize=8)
    ax.set_xlabel("test images (true → predicted)")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"The {len(pairs)} most-confused pairs of {len(classes)} classes ({int(matrix.sum())} test images, "
                 f"accuracy {accuracy:.2%}); the whole matrix is in confusion_matrix.csv", fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, title: str = "", error: bool = False, best_epoch: int | None = None) -> None:
    """curves.png: loss and accuracy (or error) against epoch, train, val and test, from metrics.csv;
    `best_epoch` (with a test curve): whose weights the run's headline test score is."""
    note = test_curve_note(best_epoch) if best_epoch else ""
    curves_figure(pd.read_csv(run_dir / "metrics.csv"), title, error, note).savefig(run_dir / "curves.png", dpi=120)


def test_curve_note(best_epoch: int | None) -> str:
    """Said beside a test curve: it is not the run's headline test score."""
    return f"test curve: each epoch's weights; the run's test_acc: the best-validation weights (epoch {best_epoch})"


def curves_figure(metrics: pd.DataFrame, title: str = "", error: bool = False, note: str = "") -> Figure:
    """Loss and accuracy against epoch, train and val (and test, where it was measured every epoch);
    `error`: 1 - accuracy instead (viz.curves=error); `note`: a line under the plots."""
    fig = Figure(figsize=(11, 4.3 if note else 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
            column = f"{split}_{metric}"
            if column in metrics and metrics[column].notna().any():
                values = 1 - metrics[column] if metric == "acc" and error else metrics[column]
                ax.plot(metrics["epoch"], values, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(("error" if error else "accuracy") if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        if ax.lines:  # a run that diverged in its first epoch has nothing to label
            ax.legend()
    if title:
        fig.suptitle(title)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return fig


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def console_table(summary: Summary, run_dir: Path) -> str:
    """The few lines a run ends with on the console: how it went and where its files are."""
    s = summary
    rows = [("status", str(s.status))]
    if isinstance(s.test_acc, (int, float)):
        rows.append(("test accuracy", f"{s.test_acc:.2%}  (loss {s.test_loss:.4f}, {s.test_checkpoint or 'best'} weights)"))
    if s.best_epoch:
        val = s.best_val_acc
        rows.append(("best epoch", f"{s.best_epoch} of {s.epochs_completed or '?'}"
                                   + (f"  (val accuracy {val:.2%})" if isinstance(val, (int, float)) else "")))
    if s.params_total is not None:
        rows.append(("parameters", f"{s.params_total:,}  ({s.model_size_mb or 0:.2f} MB)"))
    if s.train_seconds is not None:
        rows.append(("time", f"{_duration(s.train_seconds)} training" + (f" on {s.device}" if s.device else "")))
    rows.append(("run directory", str(run_dir.resolve())))
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    title = f"{s.model or ''} on {s.dataset or ''}".strip()
    return "\n".join([title, rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])
