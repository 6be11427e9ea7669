"""Study presets in conf/experiment/: each composes, every job of its sweep validates, and one runs end to end."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from cnnlab.config import config_dir, validate
from conftest import config_options, run_cnnlab

README = Path(__file__).resolve().parent.parent / "README.md"
# preset -> the axes its sweep must have (the studies)
EXPECTED = {
    "lenet_grid": {"optimizer.lr": ["0.1", "0.01", "0.001"], "model.activation": ["sigmoid", "tanh"],
                   "loss": ["mse", "cross_entropy"]},
    "kernel_size": {"model.kernel_size": ["3", "5"], "trainer.seed": ["0", "1", "2"]},
    "dropout_study": {"model": ["alexnet", "vgg11", "resnet18"], "model.dropout": ["0.0", "0.5"],
                      "dataset": ["cifar10", "cifar100"]},
    "depth_study": {"model": ["vgg11", "vgg16", "vgg19", "resnet11", "resnet18", "resnet34"]},
    "optimizer_study": {"optimizer": ["sgd", "adam", "radam"], "trainer.seed": ["0", "1", "2"]},
    "augmentation_study": {"augmentation": ["none", "flip", "cifar", "cifar_strong"]},
}


def preset_jobs(name: str) -> list[list[str]]:
    """The per-job overrides Hydra's basic sweeper makes of the preset's sweeper params."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parser = OverridesParser.create()
    axes = []
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*axes)]


SEARCHES = ("lr_search",)  # hydra/sweeper=optuna presets: tests/test_search.py runs them


def test_every_preset_is_tested() -> None:
    assert config_options("experiment") == sorted([*EXPECTED, *SEARCHES])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_sweeps_the_study_and_every_job_validates(name: str) -> None:
    jobs = preset_jobs(name)
    axes = {}
    for job in jobs:
        for override in job:
            key, value = override.split("=", 1)
            axes.setdefault(key, []).append(value)
    assert {k: list(dict.fromkeys(v)) for k, v in axes.items()} == EXPECTED[name]
    for job in jobs:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"+experiment={name}", *job])
        run = validate(cfg)  # unknown keys, wrong types and ranges fail here
        if "dataset" not in axes:
            assert run.dataset.name == "cifar10"
        assert run.trainer.epochs >= 20
    assert f"`{name}`" in README.read_text()  # documented with what it answers


def test_lenet_grid_settings() -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=lenet_grid"], return_hydra_config=True)
    assert (cfg.model.name, cfg.dataset.name, cfg.scheduler.name) == ("lenet", "cifar10", "none")
    assert list(cfg.report.facet) == ["model.activation", "loss"]
    assert str(cfg.hydra.sweep.dir).endswith("_lenet_grid")


def test_preset_runs_as_a_sweep_with_seed_means(tmp_path: Path) -> None:
    """kernel_size on synthetic data: 6 jobs, and the report averages the 3 seeds of each kernel size."""
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+experiment=kernel_size", "+debug=smoke", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(table) == 6 and (table["status"] == "completed").all()
    assert sorted(zip(table["model.kernel_size"], table["trainer.seed"])) == [(k, s) for k in (3, 5) for s in (0, 1, 2)]
    seeds = pd.read_csv(sweep / "sweep_seeds.csv").set_index("model.kernel_size")
    assert list(seeds["seeds"]) == [3, 3]
    for kernel, group in table.groupby("model.kernel_size"):
        assert seeds.loc[kernel, "test_acc_mean"] == pytest.approx(group["test_acc"].mean())
        assert seeds.loc[kernel, "test_acc_std"] == pytest.approx(group["test_acc"].std())
    summary = json.loads((Path(table["path"][0]) / "summary.json").read_text())
    assert summary["config"]["model"]["name"] == "lenet" and summary["config"]["trainer"]["epochs"] == 2  # smoke wins


def test_preset_without_multirun_warns(tmp_path: Path) -> None:
    done = run_cnnlab("+experiment=kernel_size", "+debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "defines a sweep (model.kernel_size=3,5, trainer.seed=0,1,2) but runs once" in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


SMALL = ("dataset.download=false", "dataset.subset=48", "dataset.val_split=8", "trainer.epochs=1",
         "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.device=cpu", "trainer.progress=false",
         "trainer.checkpoints=none")  # ResNet-18 checkpoints are 45 MB each: not what these tests check


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if n != "kernel_size"])  # kernel_size: above
def test_every_preset_runs_end_to_end_on_small_data(name: str, tmp_path: Path) -> None:
    """Each study's whole sweep, on CIFAR files in the real format (a few dozen images) for one epoch."""
    from test_data import write_cifar10, write_cifar100

    root = tmp_path / "data"
    write_cifar10(root)
    write_cifar100(root)
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", f"+experiment={name}", f"dataset.root={root}", *SMALL, f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(table) == len(preset_jobs(name)) and (table["status"] == "completed").all(), table[["run", "status"]]
    assert (sweep / "sweep_curves.png").is_file() and (sweep / "sweep_summary.md").is_file()
    if name == "lenet_grid":  # the paper's LeNet, with test curves and error plots
        first = Path(table["path"][0])
        summary = json.loads((first / "summary.json").read_text())
        assert summary["params_total"] == 62_006
        assert summary["config"]["trainer"]["test_every_epoch"] and summary["config"]["viz"]["curves"] == "error"
        assert "test_acc" in pd.read_csv(first / "metrics.csv")
        assert (sweep / "sweep_params.png").is_file()  # accuracy against the learning rate
