"""`torchrun --nproc_per_node=2 -m cnnlab`: DistributedDataParallel with gloo on two CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cnnlab

TOLERANCE = 1e-4  # two processes sum gradients in another order than one; nothing else may differ


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "cnnlab", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


SMOKE = ("+debug=smoke", "trainer.epochs=3", "trainer.batch_size=32")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference: one process, the same global batch."""
    tmp = tmp_path_factory.mktemp("single")
    result = run_cnnlab(*SMOKE, f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "run"


def _compare(run_dir: Path, reference: Path) -> None:
    ours, theirs = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(reference / "metrics.csv")
    assert list(ours["epoch"]) == [1, 2, 3]
    for column in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert ours[column].tolist() == pytest.approx(theirs[column].tolist(), abs=TOLERANCE), column
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert a["status"] == "completed" and a["world_size"] == 2 and b["world_size"] == 1
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=TOLERANCE)
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=TOLERANCE)
    assert a["test_size"] == b["test_size"] == 128
    confusion = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0)
    assert confusion.to_numpy().sum() == 128  # every test image counted once over both ranks


@pytest.mark.parametrize("loader", ["resident", "streaming"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, single_run, loader):
    result = torchrun(*SMOKE, f"dataset.loader={loader}", "dataset.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _compare(tmp_path / "run", single_run)
    # rank 0 alone wrote: one log, one summary, no stray run dir or .hydra from rank 1 in the cwd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("epoch 3/3") == 1 and "test (epoch" in log


def test_distributed_run_resumes_and_extends(tmp_path, single_run):
    run_dir = tmp_path / "run"
    first = torchrun(*SMOKE[:1], "trainer.epochs=2", "trainer.batch_size=32", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("trainer.resume=" + str(run_dir), "trainer.epochs=3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["resumes"]) == 1 and summary["epochs_completed"] == 3


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error(tmp_path):
    result = torchrun("+debug=smoke", "trainer.batch_size=33", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "trainer.batch_size=33 is the global batch and must divide evenly over the 2 processes" in result.stdout
