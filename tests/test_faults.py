"""Fault injection: a run SIGKILLed at any point (during an epoch, during each checkpoint write, during
the record's and the metrics' writes, between the last epoch and the test score, during the score)
is finished by `trainer.resume`, with the test score and the metrics of a run that was never killed.

The kill is deterministic, not timed: the run starts in a small wrapper that makes one named call
(the Nth training step, the Nth rename onto best.pt, ...) kill its own process with SIGKILL, which
runs no cleanup, exactly as the OOM killer or a power cut would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnlab.record import Status, read_summary

from conftest import run_cnnlab

SMOKE = ("+debug=smoke",)  # 2 epochs of 7 steps; epoch 2 is the best one
COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]

WRAPPER = r'''
import os, signal, sys
kind, target, nth = os.environ["CNNLAB_KILL_AT"].split(":")
nth, calls = int(nth), [0]

def hit() -> None:
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "step":  # the nth training step, before it runs
    import cnnlab.engine as engine
    inputs = engine.StepContext.inputs
    def counted(self, images, train):
        if train:
            hit()
        return inputs(self, images, train)
    engine.StepContext.inputs = counted
elif kind == "rename":  # an atomic write of `target` with its temporary file written, not yet renamed
    replace = os.replace
    def renaming(src, dst, *args, **kwargs):
        if os.path.basename(dst) == target:
            hit()
        return replace(src, dst, *args, **kwargs)
    os.replace = renaming
elif kind == "metrics_row":  # half of a metrics.csv row written
    import cnnlab.report as report
    append = report.append_metrics
    def torn(run_dir, row):
        if calls[0] + 1 == nth:
            with open(os.path.join(run_dir, "metrics.csv"), "a") as f:
                f.write(f"{row['epoch']},{row['train_loss']}")
                f.flush()
        hit()
        return append(run_dir, row)
    report.append_metrics = torn
elif kind == "call":  # the nth call of cnnlab.fit.<target>
    import cnnlab.fit as train
    original = getattr(train, target)
    def called(*args, **kwargs):
        hit()
        return original(*args, **kwargs)
    setattr(train, target, called)

from cnnlab.__main__ import main
sys.argv[1:] = sys.argv[2:]
main()
'''

KILL_POINTS = {
    "in epoch 1, before any checkpoint": "step:-:4",
    "in epoch 2": "step:-:11",
    "writing best.pt of epoch 1": "rename:best.pt:1",
    "writing last.pt of epoch 1": "rename:last.pt:1",
    "writing best.pt of epoch 2": "rename:best.pt:2",
    "writing last.pt of epoch 2": "rename:last.pt:2",
    "writing summary.json": "rename:summary.json:4",
    "writing the metrics row of epoch 2": "metrics_row:-:2",
    "between the last epoch and the test score": "call:finish:1",
    "scoring the test set": "call:evaluate:3",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never killed."""
    root = tmp_path_factory.mktemp("reference")
    done = run_cnnlab(*SMOKE, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_a_run_killed_anywhere_is_finished_by_resume(where: str, reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", WRAPPER, "-", *SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env={**os.environ, "CNNLAB_KILL_AT": KILL_POINTS[where], "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, f"not killed {where}: {killed.stderr[-2000:]}"
    assert read_summary(run_dir).status == Status.KILLED  # reports see a killed run, not a running one

    done = run_cnnlab(f"trainer.resume={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["test_acc"] == expected["test_acc"] and summary["best_epoch"] == expected["best_epoch"]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "metrics.csv")[COLUMNS],
                                  pd.read_csv(reference / "metrics.csv")[COLUMNS])  # no epoch twice, none torn
    assert (run_dir / "confusion_matrix.csv").read_text() == (reference / "confusion_matrix.csv").read_text()
    assert (run_dir / "curves.png").is_file()
    leftovers = [p.name for p in run_dir.rglob(".*.tmp")]
    assert not leftovers, leftovers  # a killed write's temporary file is cleaned up by the resume
