"""One run per directory: runs started together get their own, a new run never writes into a directory
that holds one, and a live run's directory is not shared, resume included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cnnlab.config import config_dir
from cnnlab.record import claim

from conftest import run_cnnlab


def test_runs_started_at_once_each_get_their_own_directory(tmp_path: Path) -> None:
    """The default run dir names the second; three runs started together all resolve the same name."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    base = "${cnnlab.unique_dir:outputs/runs/same_second}"
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab", "+debug=smoke", f"trainer.seed={seed}",
                               f"hydra.run.dir={base}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 2, 3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert [r.name for r in runs] == ["same_second", "same_second_2", "same_second_3"]
    seeds = set()
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["overrides"][1] == f"trainer.seed={summary['seed']}"
        assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]  # not interleaved
        seeds.add(summary["seed"])
    assert seeds == {1, 2, 3}


def test_the_default_run_dir_is_claimed_uniquely() -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"].startswith("${cnnlab.unique_dir:outputs/runs/")


def test_a_new_run_into_a_directory_holding_a_run_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_cnnlab("+debug=smoke", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = run_cnnlab("+debug=smoke", "optimizer.lr=0.1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 2
    assert f"trainer.resume={run_dir}" in again.stderr and "already holds a run" in again.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # not one byte written
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_a_live_run_directory_is_not_shared_not_even_by_a_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_cnnlab("+debug=smoke", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    summary = (run_dir / "summary.json").read_text()
    with claim(run_dir):  # as a process training in it would
        done = run_cnnlab(f"trainer.resume={run_dir}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 2
    assert f"run directory {run_dir} is in use by cnnlab pid {os.getpid()}" in done.stdout + done.stderr
    assert (run_dir / "summary.json").read_text() == summary
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_a_config_refused_before_training_leaves_no_run_directory(tmp_path: Path) -> None:
    for bad in (("optimizer.lr=-1",),  # refused by validation
                ("model=alexnet_original",),  # refused when the model is built for the dataset's 16x16 images
                ("model=lenett",)):  # refused when the command line is composed, before Hydra starts
        done = run_cnnlab("+debug=smoke", *bad, cwd=tmp_path)
        assert done.returncode == 2, (bad, done.stdout[-500:], done.stderr[-1500:])
        runs = tmp_path / "outputs" / "runs"
        assert not runs.exists() or not list(runs.iterdir()), (bad, list(runs.iterdir()))
