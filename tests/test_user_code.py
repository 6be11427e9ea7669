"""The user's own model and data, through the `cnnlab` console script: a file the test writes into a
temporary working directory is trained, evaluated, predicted with, resumed and swept (joblib and
submitit_local), and every way it can be wrong is one message with exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from test_run import check_run_dir

SCRIPT = Path(sys.executable).parent / "cnnlab"  # the console script `pip install` made
SMOKE = ["+debug=smoke", "trainer.doctor_every=1"]  # synthetic 3x16x16 images, 10 classes, 2 epochs

MYNET = '''
import torch
from torch import nn


class TinyVGG(nn.Module):
    """What a student writes: sizes from the constructor, nothing of cnnlab imported."""

    def __init__(self, in_channels, num_classes, image_size, width=16, dropout=0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(width * (image_size // 4) ** 2, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def fixed(num_classes):  # a function returning a module works too; it takes no in_channels
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


class Flat(nn.Module):  # sized for 10-pixel images: fails on 16x16 ones
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(3 * 10 * 10, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Broken(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        raise RuntimeError("forgot to finish this layer")


class NoLogits(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)

    def forward(self, x):
        return self.conv(x)
'''

MYDATA = '''
import numpy as np
import torch


def load(n=240, size=12, dtype="uint8", labels="ok"):
    g = torch.Generator().manual_seed(0)
    proto = torch.rand(3, 1, size, size, generator=g) * 255

    def make(k):
        y = torch.arange(k) % 3
        x = (proto[y] + torch.randn(k, 1, size, size, generator=g) * 30).clamp(0, 255).to(torch.uint8)
        return x[:, 0].numpy(), y.numpy()  # numpy N x H x W: one channel

    (xtr, ytr), (xte, yte) = make(n), make(n // 2)
    if dtype == "float":
        xtr = xtr.astype("float32") / 255 - 0.5
    if labels == "range":
        ytr = ytr + 5
    if labels == "short":
        ytr = ytr[:-1]
    return {"train": (xtr, ytr), "test": (xte, yte), "classes": ["circle", "square", "star"]}


def tuple_of_three():
    return 1, 2, 3, 4
'''


def cnnlab(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "mynet.py").write_text(MYNET)
    (tmp_path / "mydata.py").write_text(MYDATA)
    return tmp_path


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one paragraph naming what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def test_a_users_model_file_trains_evaluates_predicts_and_resumes(user_dir: Path) -> None:
    model = ["model=custom", "model._target_=mynet.TinyVGG", "+model.width=8", "model.dropout=0.1"]
    result = cnnlab(*model, *SMOKE, "viz.feature_maps=true", "hydra.run.dir=run", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run = user_dir / "run"
    summary = check_run_dir(run, epochs=2, test_size=128)
    assert summary["model"] == "mynet.TinyVGG"
    assert summary["config"]["model"]["kwargs"] == {"width": 8} and summary["config"]["model"]["dropout"] == 0.1
    assert (run / "model_summary.txt").read_text().startswith("model: mynet.TinyVGG    input: 3x16x16")
    assert summary["params_total"] == (3 * 9 * 8 + 8) + (8 * 9 * 8 + 8) + (8 * 4 * 4 * 10 + 10)  # width 8, 16 px
    assert (run / "feature_maps.png").stat().st_size > 5000  # the last conv layer, found by type

    evaluated = cnnlab("evaluate", "run=run", "out=eval", cwd=user_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((user_dir / "eval" / "eval_summary.json").read_text())["accuracy"] == pytest.approx(summary["test_acc"])

    pictures = user_dir / "pictures"
    pictures.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 40, 200 - 60 * i)).save(pictures / f"{i}.png")
    predicted = cnnlab("predict", "run=run", "images=pictures", "out=pred.csv", cwd=user_dir)
    assert predicted.returncode == 0, predicted.stderr
    assert len(pd.read_csv(user_dir / "pred.csv")["path"].unique()) == 3

    resumed = cnnlab("trainer.resume=run", "trainer.epochs=3", cwd=user_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("launcher", [["hydra/launcher=basic"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]],
                         ids=["basic", "joblib", "submitit_local"])
def test_a_users_model_sweeps_with_workers_that_import_it(user_dir: Path, launcher: list[str]) -> None:
    """Each worker process imports mynet.py from the working directory, which only the parent was in."""
    result = cnnlab("-m", *launcher, "model=custom", "model._target_=mynet.TinyVGG", "+model.width=4",
                    *SMOKE, "optimizer.lr=0.05,0.01", "hydra.sweep.dir=sweep", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (user_dir / "sweep").iterdir() if (p / "summary.json").is_file())
    assert [p.name for p in jobs] == ["0_lr-0.05", "1_lr-0.01"]
    for job in jobs:
        summary = check_run_dir(job, epochs=2, test_size=128)
        assert summary["model"] == "mynet.TinyVGG"
    table = pd.read_csv(user_dir / "sweep" / "sweep_summary.csv")
    assert sorted(table["status"]) == ["completed", "completed"]


def test_a_function_that_returns_a_model_gets_only_what_it_takes(user_dir: Path) -> None:
    result = cnnlab("model=custom", "model._target_=mynet.fixed", *SMOKE, "trainer.epochs=1", "hydra.run.dir=run",
                    cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_run_dir(user_dir / "run", epochs=1, test_size=128)["params_total"] == 3 * 9 * 4 + 4 + 4 * 10 + 10


def test_users_data_trains_and_its_checkpoint_predicts_without_the_data_code(user_dir: Path) -> None:
    result = cnnlab("model=custom", "model._target_=mynet.TinyVGG", "+model.width=4", "dataset=custom",
                    "dataset._target_=mydata.load", "+dataset.size=12", "trainer.epochs=4", "trainer.batch_size=16",
                    "trainer.device=cpu", "hydra.run.dir=run", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(user_dir / "run", epochs=4, test_size=120, classes=["circle", "square", "star"])
    assert summary["input_shape"] == [1, 12, 12] and summary["dataset"] == "custom"
    assert summary["test_acc"] > 0.6  # three learnable prototypes: far above chance (1/3)
    spec = json.loads((user_dir / "run" / "summary.json").read_text())
    assert spec["num_classes"] == 3

    (user_dir / "mydata.py").unlink()  # predict reads the spec (shape, classes, mean/std) from the checkpoint
    Image.new("L", (12, 12), 128).save(user_dir / "one.png")
    predicted = cnnlab("predict", "run=run", "images=one.png", "out=pred.csv", cwd=user_dir)
    assert predicted.returncode == 0, predicted.stderr
    assert pd.read_csv(user_dir / "pred.csv")["class"].iloc[0] in ("circle", "square", "star")


def test_models_prints_the_card_of_a_users_model(user_dir: Path) -> None:
    result = cnnlab("models", "model=custom", "model._target_=mynet.TinyVGG", "+model.width=8", "--dataset", "cifar10",
                    cwd=user_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: mynet.TinyVGG    input: 3x32x32    classes: 10")
    params = (3 * 9 * 8 + 8) + (8 * 9 * 8 + 8) + (8 * 8 * 8 * 10 + 10)
    assert f"params: {params:,} total" in result.stdout


REGISTERED = '''
import cnnlab
from torch import nn


@cnnlab.register_model("tinynet")
class TinyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 4, activation: str = "relu"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3), cnnlab.make_activation(activation),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
'''


def test_a_registered_model_has_a_name_and_typed_keys(user_dir: Path) -> None:
    (user_dir / "mymodels.py").write_text(REGISTERED)
    result = cnnlab("imports=[mymodels]", "model=tinynet", "model.width=6", "model.activation=tanh", *SMOKE,
                    "trainer.epochs=1", "hydra.run.dir=run", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(user_dir / "run", epochs=1, test_size=128)
    assert summary["model"] == "tinynet" and summary["config"]["model"]["width"] == 6
    assert summary["params_total"] == 3 * 9 * 6 + 6 + 6 * 10 + 10
    refused(cnnlab("imports=[mymodels]", "model=tinynet", "model.width=wide", *SMOKE, cwd=user_dir),
            "model.width", "wide")
    refused(cnnlab("imports=[mymodels]", "model=tinynet", "model.depth=3", *SMOKE, cwd=user_dir),
            "model.depth", "width")

    # a user's config group adds conf/model/tinynet.yaml, found through --config-dir
    conf = user_dir / "myconf" / "model"
    conf.mkdir(parents=True)
    (conf / "tinynet.yaml").write_text("name: tinynet\nwidth: 5\n")
    result = cnnlab("--config-dir", "myconf", "imports=[mymodels]", "model=tinynet", *SMOKE, "trainer.epochs=1",
                    "hydra.run.dir=run2", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((user_dir / "run2" / "summary.json").read_text())["config"]["model"]["width"] == 5


def test_an_installed_package_offers_models_through_entry_points(tmp_path: Path) -> None:
    """A package on the path with a `cnnlab.models` entry point: found with no import by the user."""
    site = tmp_path / "site"
    (site / "epmodels").mkdir(parents=True)
    (site / "epmodels" / "__init__.py").write_text(REGISTERED.replace('@cnnlab.register_model("tinynet")\n', ""))
    dist = site / "epmodels-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epmodels\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cnnlab.models]\nepnet = epmodels:TinyNet\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = cnnlab("model=epnet", "model.width=3", *SMOKE, "trainer.epochs=1", "hydra.run.dir=run", cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_run_dir(work / "run", epochs=1, test_size=128)["params_total"] == 3 * 9 * 3 + 3 + 3 * 10 + 10
    listed = cnnlab("models", "--dataset", "mnist", cwd=work, env=env)
    assert listed.returncode == 0 and "| epnet" in listed.stdout


CLASH = '''
import cnnlab
from torch import nn


@cnnlab.register_model("vgg11")
class Mine(nn.Module):
    pass
'''


@pytest.mark.parametrize(("args", "needles"), [
    (["model=custom"], ["model=custom needs model._target_=<module.Class>"]),
    (["model=custom", "model._target_=TinyVGG"], ["model._target_='TinyVGG' must be a dotted path"]),
    (["model=custom", "model._target_=nosuch.Net"], ["no module named 'nosuch'", "directory you run cnnlab from"]),
    (["model=custom", "model._target_=mynet.TinyVG"], ["mynet has no 'TinyVG'", "TinyVGG"]),
    (["model=custom", "model._target_=syntax.Net"], ["importing syntax raised SyntaxError"]),
    (["model=custom", "model._target_=mynet.TinyVGG", "+model.widht=8"], ["takes no argument 'widht'", "width=16"]),
    (["model=custom", "model._target_=mynet.Broken"], ["raised RuntimeError: forgot to finish this layer"]),
    (["model=custom", "model._target_=mynet.Flat"], ["mynet.Flat fails on a 3x16x16 image", "mat1 and mat2"]),
    (["model=custom", "model._target_=mynet.NoLogits"], ["mynet.NoLogits returns (1, 4, 14, 14) for one image", "logits of shape (batch, 10)"]),
    (["model=custom", "model._target_=mynet.fixed", "model.activation=tanh"], ["takes no argument 'activation'"]),
    (["imports=[clash]", "model=vgg11"], ["model name 'vgg11' is taken (a cnnlab built-in)", "replace=True"]),
    (["imports=[nosuch]"], ["imports=['nosuch']: no module named 'nosuch'"]),
    (["dataset=custom"], ["dataset=custom needs dataset._target_=<module.function>"]),
    (["dataset=custom", "dataset._target_=mydata.load", "+dataset.dtype=float"], ["images are float32", "normalized"]),
    (["dataset=custom", "dataset._target_=mydata.load", "+dataset.labels=range"], ["labels range 5..7, outside 0..2"]),
    (["dataset=custom", "dataset._target_=mydata.load", "+dataset.labels=short"], ["240 images but labels of shape (239,)"]),
    (["dataset=custom", "dataset._target_=mydata.tuple_of_three"], ["returned tuple", "'train'"]),
], ids=lambda v: "_".join(v) if isinstance(v, list) and v and "=" in v[0] else None)
def test_bad_user_code_is_one_message_and_exit_2(user_dir: Path, args: list[str], needles: list[str]) -> None:
    (user_dir / "syntax.py").write_text("def broken(:\n    pass\n")
    (user_dir / "clash.py").write_text(CLASH)
    settings = ["trainer.epochs=1", "trainer.device=cpu"] if "dataset=custom" in args else SMOKE  # smoke sets dataset keys
    text = refused(cnnlab(*args, *settings, cwd=user_dir), *needles)
    assert len(text.strip().splitlines()) <= 2, text
    assert not (user_dir / "outputs").exists() or not any((user_dir / "outputs").rglob("summary.json"))


def test_a_sweep_with_a_broken_model_starts_no_job(user_dir: Path) -> None:
    result = cnnlab("-m", "model=custom", "model._target_=mynet.TinyVGG,mynet.Flat", *SMOKE, "hydra.sweep.dir=sweep",
                    cwd=user_dir)
    refused(result, "1 of the 2 jobs of this sweep has a config error", "mynet.Flat fails on a 3x16x16 image")
    assert not any((user_dir / "sweep").rglob("summary.json")) if (user_dir / "sweep").exists() else True


def test_the_example_network_trains_from_the_cli(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    result = cnnlab("model=custom", "model._target_=tinyvgg.TinyVGG", "+model.width=8", "model.activation=swish",
                    "model.batch_norm=true", *SMOKE, f"hydra.run.dir={tmp_path / 'run'}", cwd=examples)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(tmp_path / "run", epochs=2, test_size=128)
    assert summary["model"] == "tinyvgg.TinyVGG" and summary["config"]["model"]["activation"] == "swish"
    assert "Swish" in (tmp_path / "run" / "model_summary.txt").read_text()
    assert not (examples / "outputs").exists()
