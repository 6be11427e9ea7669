"""Sweeps you can stop and finish: job directories with short, safe names that resume takes as they
are, and a sweep run again in its directory keeps finished jobs untouched, resumes the stopped
ones, reruns the failed ones and reports them all."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cnnlab.rundir import JOB_NAME_LIMIT, job_dir_name

from conftest import run_cnnlab

SWEEP = ("-m", "+debug=smoke", "optimizer.lr=0.1,0.05,0.01")  # three jobs of 2 epochs x 7 steps
COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]

# The sweep runs in this wrapper, whose Nth training step (counted over the jobs, which the basic
# launcher runs one after another in this process) kills the process, stops it with SIGTERM, or fails.
WRAPPER = r'''
import os, signal, sys
import cnnlab.engine as engine
inputs, calls = engine.StepContext.inputs, [0]
def counted(self, images, train):
    if train:
        calls[0] += 1
        if calls[0] == int(os.environ["STEP"]):
            if os.environ["DO"] == "fail":
                raise RuntimeError("a failure in the middle of a job")
            os.kill(os.getpid(), getattr(signal, os.environ["DO"]))
    return inputs(self, images, train)
engine.StepContext.inputs = counted
from cnnlab.__main__ import main
sys.argv[1:] = sys.argv[2:]
main()
'''


def stopped_sweep(tmp_path: Path, step: int, do: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STEP": str(step), "DO": do, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", WRAPPER, "-", *SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def files(job: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(job)): (p.read_bytes(), p.stat().st_mtime_ns) for p in job.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The metrics of job 1 (lr 0.05) run on its own, never stopped."""
    root = tmp_path_factory.mktemp("alone")
    assert run_cnnlab("+debug=smoke", "optimizer.lr=0.05", f"hydra.run.dir={root / 'run'}", cwd=root).returncode == 0
    return pd.read_csv(root / "run" / "metrics.csv")[COLUMNS]


def check_finished(sweep: Path, alone: pd.DataFrame) -> None:
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_lr-0.1", "1_lr-0.05", "2_lr-0.01"]
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(table) == 3 and set(table["status"]) == {"completed"}
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "1_lr-0.05" / "metrics.csv")[COLUMNS], alone)  # no epoch twice


@pytest.mark.parametrize("do, code", [("SIGKILL", -9), ("fail", 1)])
def test_a_sweep_run_again_finishes_without_redoing_finished_jobs(tmp_path: Path, alone, do: str, code: int) -> None:
    stopped = stopped_sweep(tmp_path, 14 + 11, do)  # job 1, epoch 2: job 0 took 14 steps
    assert stopped.returncode == code, stopped.stderr[-2000:]
    sweep = tmp_path / "sweep"
    job0 = files(sweep / "0_lr-0.1")
    status = json.loads((sweep / "1_lr-0.05" / "summary.json").read_text())["status"]
    assert status == ("running" if do == "SIGKILL" else "failed")  # running: the process died with it

    again = run_cnnlab(*SWEEP, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0_lr-0.1: completed in an earlier run of this sweep; kept as it is" in again.stdout
    assert files(sweep / "0_lr-0.1") == job0  # not one byte or time stamp changed, .hydra/ included
    check_finished(sweep, alone)


def test_a_sweep_stopped_by_sigterm_goes_on_with_the_command_it_prints(tmp_path: Path, alone) -> None:
    stopped = stopped_sweep(tmp_path, 14 + 4, "SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    printed = [line for line in (stopped.stdout + stopped.stderr).splitlines() if "Continue with: " in line]
    assert printed, stopped.stdout[-2000:]
    command = shlex.split(printed[-1].split("Continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "cnnlab"] and f"hydra.sweep.dir={tmp_path / 'sweep'}" in command
    again = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    check_finished(tmp_path / "sweep", alone)


# SIGTERM while job 0 scores its test set and draws its plots (fit.finish), after its training
AFTER_TRAINING = r'''
import os, signal, sys
import cnnlab.fit as fit
finish = fit.finish
def signalled(*args, **kwargs):
    if not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return finish(*args, **kwargs)
fit.finish = signalled
from cnnlab.__main__ import main
sys.argv[1:] = sys.argv[2:]
main()
'''


@pytest.mark.parametrize("launcher, first", [((), ["0_lr-0.1"]),
                                             (("hydra/launcher=fused", "hydra.launcher.max_members=2"),
                                              ["0_lr-0.1", "1_lr-0.05"])])
def test_a_signal_after_a_jobs_training_stops_the_sweep_before_its_next_job(tmp_path: Path, alone, launcher: tuple,
                                                                            first: list[str]) -> None:
    """The job (a fused group: each of its jobs) completes, as the signal found its training done; the sweep stops
    there with 128+N, and the command it prints goes on with the jobs not yet run."""
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SENT")}
    stopped = subprocess.run([sys.executable, "-c", AFTER_TRAINING, "-", *SWEEP, *launcher, f"hydra.sweep.dir={sweep}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    out = stopped.stdout + stopped.stderr
    assert "SIGTERM came after this job's training, so the job ended as its summary.json says; the sweep stops before " \
           "its next job" in " ".join(out.split())
    assert "Traceback" not in out
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == first  # the next job never started
    assert all(json.loads((sweep / job / "summary.json").read_text())["status"] == "completed" for job in first)
    command = shlex.split([line for line in out.splitlines() if "Continue with: " in line][-1].split("Continue with: ")[1])
    again = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"{job}: completed in an earlier run of this sweep; kept as it is" in again.stdout for job in first)
    check_finished(sweep, alone)


def test_a_sweep_run_again_with_another_command_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Its jobs would find the earlier sweep's runs under their names: a changed config, fewer epochs, a checkpoint
    that cannot be read and a file in a job's place are each exit 2, with the sweep's files untouched; more epochs
    extend its completed jobs."""
    sweep = tmp_path / "sweep"
    lrs = ("-m", "+debug=smoke", "optimizer.lr=0.1,0.05", f"hydra.sweep.dir={sweep}")
    assert run_cnnlab(*lrs, cwd=tmp_path).returncode == 0
    before = {job.name: files(job) for job in sweep.iterdir() if job.is_dir()}

    def refused(*extra: str) -> str:
        done = run_cnnlab(*lrs, *extra, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert {job.name: files(job) for job in sweep.iterdir() if job.is_dir()} == before  # not a byte or time stamp
        return " ".join(done.stderr.split())

    moved = run_cnnlab(*lrs, "dataset.root=/staged/elsewhere", cwd=tmp_path)  # where the data lies is not compared
    assert moved.returncode == 0 and "0_lr-0.1: completed in an earlier run of this sweep; kept as it is" in moved.stdout
    before = {job.name: files(job) for job in sweep.iterdir() if job.is_dir()}
    said = refused("model=vgg_tiny")
    assert "holds a sweep that this command cannot go on with, so nothing was run" in said
    assert "job 0 (0_lr-0.1) was trained with model.name=lenet, not vgg_tiny" in said and "hydra.sweep.dir=<new dir>" in said
    assert "job 1 (1_lr-0.05) has trained 2 epochs, more than trainer.epochs=1" in refused("trainer.epochs=1")

    longer = run_cnnlab(*lrs, "trainer.epochs=3", cwd=tmp_path)  # completed jobs are extended, as a resume would
    assert longer.returncode == 0, longer.stderr[-2000:]
    for job in ("0_lr-0.1", "1_lr-0.05"):
        assert pd.read_csv(sweep / job / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"

    record = sweep / "1_lr-0.05" / "summary.json"
    record.write_text(record.read_text().replace('"status": "completed"', '"status": "interrupted"'))
    (sweep / "1_lr-0.05" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    before = {job.name: files(job) for job in sweep.iterdir() if job.is_dir()}
    said = refused("trainer.epochs=3")
    assert "job 1 (1_lr-0.05) must go on from its last checkpoint, which cannot be read" in said
    assert f"move {sweep / '1_lr-0.05'} away to train it from its start" in said

    shutil.rmtree(sweep / "1_lr-0.05")
    (sweep / "1_lr-0.05").write_text("")
    before = {job.name: files(job) for job in sweep.iterdir() if job.is_dir()}
    assert "job 1 (1_lr-0.05) finds a file where its directory goes" in refused("trainer.epochs=3")


def test_a_one_job_sweep_finds_its_directory_by_all_its_overrides(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "0_debug-smoke_epochs-1").write_text("")  # where the job's directory goes: named by every override
    done = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "job 0 (0_debug-smoke_epochs-1) finds a file where its directory goes" in " ".join(done.stderr.split())
    assert [p.name for p in sweep.iterdir()] == ["0_debug-smoke_epochs-1"]


def test_job_directories_are_short_safe_and_resume_takes_them(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=1", "model.activation=relu,tanh",
                      "augmentation.ops=[normalize],[hflip,normalize]", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["0_activation-relu_ops-normalize", "1_activation-relu_ops-hflip-normalize",
                     "2_activation-tanh_ops-normalize", "3_activation-tanh_ops-hflip-normalize"]
    resumed = run_cnnlab(f"trainer.resume={sweep / names[3]}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert pd.read_csv(sweep / names[3] / "metrics.csv")["epoch"].tolist() == [1, 2]

    odd = tmp_path / "lr=0.1,tanh it's"  # any path resume is given: = , quote and space included
    (sweep / names[2]).rename(odd)
    resumed = run_cnnlab(f"trainer.resume={odd}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((odd / "summary.json").read_text())["epochs_completed"] == 2


def test_long_sweeps_get_capped_names() -> None:
    overrides = [f"model.arch=[[1,{64 * i}],[2,128],[2,256],[3,512]]" for i in range(1, 2)] + [
        "optimizer.lr=0.000123456789", "+model.some_very_long_key_name=a value with spaces/and/slashes",
        "dataset.root=/data", "trainer.device=cuda"]
    name = job_dir_name(117, overrides, None)
    assert len(name) <= JOB_NAME_LIMIT and name.startswith("117_arch-1-64-2-128-2-256-3-512_lr-0.000123456789_")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert "root" not in name and "device" not in name  # paths and devices never name a job
    assert job_dir_name(3, ["optimizer.lr=0.1", "model=vgg11", "loss=mse"], ["optimizer.lr", "loss"]) == "3_lr-0.1_loss-mse"
