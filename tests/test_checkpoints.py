"""Checkpoints load with weights_only=True on every path (resume, evaluate, predict): a crafted file
runs nothing, a damaged one is reported as corrupted, and runs saved in the previous format still open."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab import evaluate, predict
from cnnlab.checkpoint import FORMAT_VERSION, checksum, load_checkpoint
from cnnlab.checks import ConfigError
from cnnlab.optim import OneCycleConfig

from conftest import run_cnnlab


class Payload:
    """What a hostile checkpoint carries: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    done = run_cnnlab("+debug=smoke", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def crafted(path: Path, marker: Path) -> Path:
    """A file shaped like a cnnlab checkpoint, with a payload inside."""
    ckpt = load_checkpoint(path)
    ckpt["config"]["note"] = Payload(marker)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("entry", ["evaluate checkpoint=", "evaluate run=", "predict run=", "trainer.resume="])
def test_a_crafted_checkpoint_runs_nothing_on_any_path(run_dir: Path, tmp_path: Path, entry: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    run = copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("best.pt", "last.pt"):
        crafted(run / "checkpoints" / name, marker)
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (16, 16)).save(image)
    if entry == "trainer.resume=":
        done = run_cnnlab(f"trainer.resume={run}", "trainer.epochs=3", cwd=tmp_path)
        code, err = done.returncode, done.stdout + done.stderr
    else:
        command = evaluate if entry.startswith("evaluate") else predict
        argv = [f"run={run}"] + ([f"checkpoint={run / 'checkpoints' / 'last.pt'}"] if "checkpoint" in entry else [])
        argv += [f"images={image}"] if command is predict else [f"out={tmp_path / 'ev'}"]
        code, err = command.main(argv), capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "holds objects other than tensors and plain values (it names posix.system)" in err, err
    assert "Traceback" not in err


def test_a_flipped_bit_or_a_truncated_file_is_corrupted_not_trained_on(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["checksum"] == checksum(ckpt)
    weights = next(iter(ckpt["model"].values()))
    data = bytearray(last.read_bytes())
    at = data.find(weights.numpy().tobytes())  # the tensor's bytes, stored as they are in the zip
    assert at > 0
    data[at + 5] ^= 0x10
    last.write_bytes(bytes(data))
    done = run_cnnlab(f"trainer.resume={run}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 2 and "is corrupted: its tensors do not match the checksum" in done.stderr + done.stdout
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2  # nothing trained on it

    (run / "checkpoints" / "best.pt").write_bytes((run_dir / "checkpoints" / "best.pt").read_bytes()[:5000])
    with pytest.raises(ConfigError, match="is not a readable checkpoint: it is truncated or corrupted"):
        load_checkpoint(run / "checkpoints" / "best.pt")


def test_checkpoints_of_the_previous_format_still_resume_and_evaluate(run_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """Format 1 kept numpy's RNG state as numpy objects and the schedule's config object, and had no
    checksum: exactly those extra types are allowed for it, nothing else."""
    import numpy as np

    run = copy_run(run_dir, tmp_path)
    for name in ("best.pt", "last.pt"):
        path = run / "checkpoints" / name
        ckpt = load_checkpoint(path)
        rng = ckpt["rng"]["numpy"]
        ckpt["rng"]["numpy"] = (rng["kind"], rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                                rng["cached_gaussian"])
        ckpt["scheduler"]["lr_lambdas"] = [{"cfg": OneCycleConfig(), "steps_per_epoch": 7, "epochs": 2}]
        del ckpt["checksum"]
        torch.save({**ckpt, "format_version": 1}, path)
    assert evaluate.main([f"run={run}", f"out={tmp_path / 'ev'}"]) == 0
    capsys.readouterr()
    done = run_cnnlab(f"trainer.resume={run}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert load_checkpoint(run / "checkpoints" / "last.pt")["format_version"] == FORMAT_VERSION
