"""Sweeps through Hydra's launcher plugins (the `launchers` extra): real joblib and submitit_local
multiruns, the message when a plugin is missing, and the per-job CPU thread share and GPU lease."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import joblib
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

import cnnlab.__main__ as cli
from cnnlab import launch
from cnnlab.config import config_dir
from cnnlab.build import select_device

from conftest import run_cnnlab

JOBLIB_TARGET = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SHARE_LINE = re.compile(r"(\d+) jobs run at once: torch uses (\d+) CPU thread\(s\) in this job \(pid (\d+)\)")


def completed_summary(job_dir: Path) -> dict:
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("error")
    assert isinstance(summary["test_acc"], float) and 0 <= summary["test_acc"] <= 1
    assert summary["epochs_completed"] == summary["config"]["trainer"]["epochs"]
    assert summary["device"] == "cpu"
    return summary


# A model whose first training step waits until the other job's has begun: the sweep finishes only if
# the two jobs run at the same time (no clock comparison, so a loaded machine cannot fail it).
RENDEZVOUS = """
import os, time
from pathlib import Path
from torch import nn

class Net(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        self.met = False

    def forward(self, x):
        if self.training and x.device.type != "meta" and not self.met:
            here = Path(os.environ["RENDEZVOUS_DIR"])
            (here / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(here.iterdir())) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the other job never started while this one ran")
                time.sleep(0.05)
            self.met = True
        return self.f(x)
"""


def test_joblib_runs_two_jobs_in_parallel_each_with_its_thread_share(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (tmp_path / "rendezvous.py").write_text(RENDEZVOUS)
    (tmp_path / "met").mkdir()
    result = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=4", "optimizer.lr=0.05,0.01", "model=custom",
                        "model._target_=rendezvous.Net", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=300,
                        env={"RENDEZVOUS_DIR": str(tmp_path / "met")})
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [d.name.split("_")[0] for d in job_dirs] == ["0", "1"]

    pids = set()
    for job_dir in job_dirs:
        summary = completed_summary(job_dir)
        assert summary["epochs_completed"] == 4
        shares = SHARE_LINE.findall((job_dir / "train.log").read_text())
        assert len(shares) == 1, "the thread share is logged once per job"
        jobs, threads, pid = map(int, shares[0])
        assert (jobs, threads) == (2, max(1, joblib.cpu_count() // 2))
        pids.add(pid)
    assert len(pids) == 2, "each job ran in its own worker process"
    assert {int(p.name) for p in (tmp_path / "met").iterdir()} == pids  # and both were training at once
    assert "completed" in result.stdout and "2 jobs" in result.stdout


def test_submitit_local_runs_a_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cnnlab("-m", "+debug=smoke", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (job_dir,) = [p.parent for p in sweep_dir.glob("*/summary.json")]
    summary = completed_summary(job_dir)
    assert summary["overrides"] == ["+debug=smoke"]
    assert "test (epoch" in (job_dir / "train.log").read_text()
    # submitit ran it as its own job: its logs sit in the submitit folder under the sweep dir
    assert list((sweep_dir / ".submitit").glob("*/*_0_log.out"))
    status = re.search(rf"completed\s+{re.escape(job_dir.name)}\s+test_acc ([0-9.]+)", result.stdout)
    assert status, result.stdout[-2000:]
    assert float(status.group(1)) == pytest.approx(summary["test_acc"], abs=1e-4)


def test_slurm_config_extends_the_plugin_and_keeps_its_names():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        hydra_cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra
        plugin = compose("config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True).hydra.launcher
        local = compose("config", overrides=["hydra/launcher=submitit_local"], return_hydra_config=True).hydra.launcher
        joblib_cfg = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True).hydra.launcher
    slurm = hydra_cfg.launcher
    assert slurm._target_ == plugin._target_ and slurm._target_.endswith("SlurmLauncher")
    assert set(plugin) <= set(slurm), "every key of the plugin's config stays available"
    assert (slurm.gpus_per_node, slurm.tasks_per_node, slurm.partition) == (1, 1, None)
    assert slurm.timeout_min > 0 and slurm.cpus_per_task > 0 and slurm.mem_gb > 0
    assert slurm.submitit_folder.startswith(f"{hydra_cfg.sweep.dir}/")  # next to the runs it launched
    assert local._target_.endswith("LocalLauncher") and joblib_cfg._target_ == JOBLIB_TARGET


@pytest.mark.parametrize("argv,plugin", [
    (["-m", "hydra/launcher=joblib", "optimizer.lr=0.1,0.01"], "hydra-joblib-launcher"),
    (["-m", "hydra/launcher=submitit_local"], "hydra-submitit-launcher"),
    (["-m", "hydra/launcher=submitit_slurm"], "hydra-submitit-launcher"),
    (["-m", "hydra/launcher=slurm"], "hydra-submitit-launcher"),  # ours, extends submitit_slurm
    (["-m", "+hydra/launcher=joblib"], "hydra-joblib-launcher"),
])
def test_a_missing_plugin_names_itself_and_the_extra(monkeypatch, argv, plugin):
    monkeypatch.setattr(launch, "importable", lambda module: False)
    message = launch.missing_launcher_message(argv)
    assert message and plugin in message and "pip install 'cnnlab[launchers]'" in message
    assert argv[1].lstrip("+") in message


def test_no_message_when_installed_or_not_a_plugin(monkeypatch):
    assert launch.missing_launcher_message(["-m", "hydra/launcher=joblib"]) is None  # installed here
    monkeypatch.setattr(launch, "importable", lambda module: False)
    for argv in (["-m", "optimizer.lr=0.1,0.01"], ["hydra/launcher=basic"], ["hydra/launcher=nope"],
                 ["hydra.launcher.n_jobs=2"]):
        assert launch.missing_launcher_message(argv) is None, argv


def test_cli_stops_with_the_message_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(launch, "importable", lambda module: False)
    monkeypatch.setattr(sys, "argv", ["cnnlab", "-m", "+debug=smoke", "hydra/launcher=joblib"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "cnnlab[launchers]" in capsys.readouterr().err


def test_gpu_leases_held_at_once_are_distinct_and_released(tmp_path, caplog):
    num_gpus, holders = 3, 3
    got: list[int] = []
    all_held, done = threading.Barrier(holders + 1), threading.Event()

    def job() -> None:
        with launch.gpu_lease(tmp_path, num_gpus) as index:
            got.append(index)
            all_held.wait(timeout=120)
            done.wait(timeout=120)

    threads = [threading.Thread(target=job) for _ in range(holders)]
    for thread in threads:
        thread.start()
    all_held.wait(timeout=120)
    assert sorted(got) == [0, 1, 2]
    with caplog.at_level(logging.WARNING, logger="cnnlab"), launch.gpu_lease(tmp_path, num_gpus, fallback=7) as index:
        assert index == 7 % num_gpus  # all taken: share one instead of waiting
    assert "all 3 GPUs are leased" in caplog.text
    done.set()
    for thread in threads:
        thread.join(timeout=120)
    with launch.gpu_lease(tmp_path, num_gpus) as index:
        assert index == 0, "every lease was released when its job ended"


def test_gpu_lease_is_released_on_error_and_excludes_other_processes(tmp_path):
    with pytest.raises(RuntimeError), launch.gpu_lease(tmp_path, 2) as index:
        assert index == 0
        raise RuntimeError("the job failed")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from cnnlab.launch import gpu_lease\n"
         f"with gpu_lease(Path({str(tmp_path)!r}), 2) as i:\n    print(i, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"  # the failed job's lease was free again
        with launch.gpu_lease(tmp_path, 2) as index:
            assert index == 1, "GPU 0 is leased by the other process"
    finally:
        holder.kill()  # a worker that dies without cleaning up ...
        holder.wait(timeout=10)
    with launch.gpu_lease(tmp_path, 2) as index:
        assert index == 0  # ... leaves no stale lease behind


def test_thread_share_follows_joblib_n_jobs():
    cpus = joblib.cpu_count()
    assert launch.thread_share(OmegaConf.create({"_target_": JOBLIB_TARGET, "n_jobs": 2})) == (2, max(1, cpus // 2))
    expected_all = (cpus, 1) if cpus > 1 else None
    assert launch.thread_share(OmegaConf.create({"_target_": JOBLIB_TARGET, "n_jobs": -1})) == expected_all
    assert launch.thread_share(OmegaConf.create({"_target_": JOBLIB_TARGET, "n_jobs": 1})) is None
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    assert launch.thread_share(basic) is None


def test_jobs_on_a_multi_gpu_host_each_get_their_own_gpu(tmp_path, monkeypatch):
    """The wiring of job_placement, with torch's CUDA calls replaced: no GPU on the test machine."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["+debug=smoke", "trainer.device=auto", "hydra/launcher=joblib",
                                           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 0
    monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)
    devices, threads = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with ExitStack() as jobs:  # two jobs of the sweep at once
        jobs.enter_context(launch.job_placement(cfg))
        jobs.enter_context(launch.job_placement(cfg))
        assert devices == [0, 1]
    assert threads == [max(1, joblib.cpu_count() // 2)] * 2
    with launch.job_placement(cfg):  # the next job reuses a freed GPU
        assert devices[-1] == 0

    # and the job's summary.json names that GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert str(select_device("auto")) == str(select_device("cuda")) == "cuda:1"


def test_jobs_run_side_by_side_give_the_results_they_give_alone(tmp_path):
    """The concurrent sweep path changes where jobs run, never what they compute."""
    grid = ("+debug=smoke", "optimizer.lr=0.1,0.02", "trainer.num_threads=1")  # one thread: bitwise comparable
    together, alone = tmp_path / "together", tmp_path / "alone"
    for sweep, launcher in ((together, ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")), (alone, ())):
        done = run_cnnlab("-m", *grid, *launcher, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    for lr in ("0.1", "0.02"):
        (a,) = together.glob(f"*_lr-{lr}")
        (b,) = alone.glob(f"*_lr-{lr}")
        assert completed_summary(a)["test_acc"] == completed_summary(b)["test_acc"]
        strip = lambda text: [line.split(",")[:6] for line in text.splitlines()]  # noqa: E731 - timings aside
        assert strip((a / "metrics.csv").read_text()) == strip((b / "metrics.csv").read_text())
