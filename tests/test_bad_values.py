"""Values that used to pass validation and crash (or train on nonsense) later, and the environment's
own failures: each is one paragraph, exit 2, before anything is allocated or written where it can be."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.checkpoint import load_checkpoint
from cnnlab.checks import ConfigError
from cnnlab.data import DatasetConfig, DatasetSpec, Loaded, Split, load_dataset, register_dataset
from cnnlab.data import registry

from conftest import run_cnnlab


def refused(tmp_path: Path, *args: str) -> str:
    done = run_cnnlab("+debug=smoke", *args, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not list(runs.iterdir())  # refused before the run began: no directory left
    return output


@pytest.mark.parametrize("override", ["optimizer.lr=nan", "trainer.grad_clip=inf", "model.dropout=nan",
                                      "loss.label_smoothing=-inf", "dataset.val_split=nan", "dataset.noise=inf"])
def test_nan_and_inf_are_refused_in_any_numeric_key(tmp_path: Path, override: str) -> None:
    """Where a range or type check meets the value first its message stands; otherwise the finite check's."""
    key, value = override.split("=")
    output = refused(tmp_path, override)
    assert f"{key}={float(value)} is not a finite number" in output or f"{key}={float(value)} is out of range" in \
        output or f"{key}={float(value)} must be a fraction" in output, output
    assert len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, expected", [
    (("model=alexnet", "model.classifier_width=2000000000"), "a layer of this model is too large to exist"),
    (("model=vgg11", "model.arch=[[1,200000]]"), "training vgg11 (108,868,299 parameters) on 3x16x16 images at "
                                                "trainer.batch_size=32: about"),
    (("augmentation.ops=[{op: resize, size: 100000}, normalize]",), "on 3x100000x100000 images"),
    (("dataset.train_size=100000000",), "dataset.train_size=100000000, dataset.test_size=128 synthetic images of "
                                        "3x16x16: about 691.2 GB of memory needed"),
])
def test_sizes_too_large_for_memory_are_refused_with_the_number(tmp_path: Path, overrides, expected: str) -> None:
    output = refused(tmp_path, *overrides)
    assert expected in output, output[-1000:]
    if "size calculation" not in output and "too large to exist" not in expected:
        assert "of memory needed, but cpu has" in output and "GB free" in output


def test_an_uncreatable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cnnlab("+debug=smoke", "hydra.run.dir=/proc/cnnlab_x", cwd=tmp_path)
    assert done.returncode == 2 and "hydra.run.dir=/proc/cnnlab_x cannot be created" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_an_empty_test_set_is_refused_not_scored_as_zero() -> None:
    spec = DatasetSpec("hollow", ("a", "b"), 1, 4, 4, (0.5,), (0.5,))
    images, labels = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10) % 2
    register_dataset("hollow", spec=lambda cfg: spec, load=lambda cfg, spec: Loaded(
        Split(images, labels), Split(images[:0], labels[:0])))
    try:
        with pytest.raises(ConfigError, match="the test split is empty"):
            load_dataset(DatasetConfig(name="hollow"), seed=0)
    finally:
        del registry._REGISTRY["hollow"]


def test_a_report_over_a_malformed_summary_lists_it_as_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "runs" / "good"
    assert run_cnnlab("+debug=smoke", f"hydra.run.dir={good}", cwd=tmp_path).returncode == 0
    for name, text in (("typed", json.dumps({"status": "completed", "test_acc": "high"})), ("broken", "{not json"),
                       ("listed", "[1, 2]")):
        (tmp_path / "runs" / name).mkdir()
        (tmp_path / "runs" / name / "summary.json").write_text(text)
    done = subprocess.run([sys.executable, "-m", "cnnlab", "report", str(tmp_path / "runs")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "runs" / "sweep_summary.md").read_text()
    assert "3 unreadable" in markdown and "1 completed" in markdown
    assert "test_acc is 'high', not float" in markdown and "summary.json does not hold an object" in markdown


def test_resuming_a_checkpoint_without_a_config_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_cnnlab("+debug=smoke", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["config"]
    torch.save(ckpt, last)
    done = run_cnnlab(f"trainer.resume={run_dir}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 2 and "holds no run config, so it cannot be resumed" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path: Path) -> None:
    """The disk fills while last.pt of epoch 2 is written (fsyncs: the record, the model card, the record;
    best, last and record of epoch 1; best of epoch 2; then last): status failed, the message, last.pt still
    epoch 1; resume finishes the run."""
    code = ("import errno, os, sys; fsync, n = os.fsync, [0]\n"
            "def full(fd):\n"
            "    n[0] += 1\n"
            "    if n[0] == 8: raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return fsync(fd)\n"
            "os.fsync = full\n"
            "from cnnlab.__main__ import main; sys.argv[1:] = sys.argv[2:]; main()")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, "-", "+debug=smoke", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "no room on the disk to write" in output and "last.pt" in output, output[-2000:]
    assert "Traceback" not in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1  # the previous version, whole
    assert not list(run_dir.rglob(".*.tmp"))
    again = run_cnnlab(f"trainer.resume={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
