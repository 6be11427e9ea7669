"""Every option of every group composes and validates; bad values fail with the key and the choices."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig, validate
from cnnlab.build import prepare

from conftest import compose_config, config_options, run_cnnlab
from test_folders import make_folder

GROUPS = ("model", "dataset", "optimizer", "scheduler", "augmentation", "loss")


def test_default_config_is_lenet_on_fashion_mnist():
    run = validate(compose_config())
    assert isinstance(run, RunConfig)
    assert (run.model.name, run.dataset.name, run.optimizer.name) == ("lenet", "fashion_mnist", "sgd")
    assert run.trainer.epochs >= 1 and run.trainer.device == "auto"


# Models for large images only: the way to use them on small-image datasets is a resize op.
RESIZE_FOR = {"alexnet_original": 64}


def resize_override(model: str) -> list[str]:
    if model not in RESIZE_FOR:
        return []
    return [f"augmentation.ops=[{{op: resize, size: {RESIZE_FOR[model]}}}, normalize]"]


# the options that select the user's own code need its dotted path (tests/user_modules.py)
USER_CODE = {"model=custom": ["model._target_=user_modules.Net"], "dataset=custom": ["dataset._target_=user_modules.data"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in config_options(g)])
def test_every_group_option_composes_validates_and_builds(group, option, tmp_path):
    extra = resize_override(option) if group == "model" else []
    extra += USER_CODE.get(f"{group}={option}", [])
    if (group, option) == ("dataset", "image_folder"):  # the one dataset without a default location
        extra = [f"dataset.root={make_folder(tmp_path, {'train': {'cat': 2, 'dog': 2}, 'val': {'cat': 1, 'dog': 1}})}"]
    run = validate(compose_config(f"{group}={option}", "trainer.device=cpu", *extra))
    assert getattr(run, group).name == option
    # The model and input pipeline must build for this option before any data is touched.
    prepared = prepare(run)
    assert sum(p.numel() for p in prepared.model.parameters()) > 0


@pytest.mark.parametrize("model", config_options("model"))
@pytest.mark.parametrize("dataset", ["mnist", "cifar100", "synthetic"])
@pytest.mark.parametrize("augmentation", config_options("augmentation"))
def test_models_build_for_every_dataset_and_augmentation(model, dataset, augmentation):
    run = validate(compose_config(f"model={model}", f"dataset={dataset}", f"augmentation={augmentation}",
                                  "trainer.device=cpu", *USER_CODE.get(f"model={model}", [])))
    if model in RESIZE_FOR:  # too small as is: a clear config-time error, then the resize that fixes it
        with pytest.raises(ConfigError, match="minimum is"):
            prepare(run)
        run = validate(compose_config(f"model={model}", f"dataset={dataset}", "trainer.device=cpu",
                                      *resize_override(model)))
    prepared = prepare(run)
    prepared.model.eval()
    with torch.no_grad():
        out = prepared.model(torch.zeros(2, *prepared.pipeline.output_shape))
    assert out.shape == (2, prepared.spec.num_classes)


def test_center_crop_on_28px_data_builds_the_model_for_the_cropped_size():
    run = validate(compose_config("dataset=fashion_mnist", "trainer.device=cpu",
                                  "augmentation.ops=[{op: center_crop, size: 24}, hflip, normalize]"))
    prepared = prepare(run)
    assert prepared.pipeline.output_shape == (1, 24, 24)


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("optimizer.lr=0", "optimizer.lr", "> 0"),
        ("optimizer.lr=-0.1", "optimizer.lr", "> 0"),
        ("trainer.epochs=0", "trainer.epochs", ">= 1"),
        ("trainer.batch_size=0", "trainer.batch_size", ">= 1"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size", ">= 1"),
        ("model.dropout=1.0", "model.dropout", "[0"),
        ("model.dropout=-0.1", "model.dropout", "[0"),
        ("optimizer.momentum=1.5", "optimizer.momentum", "[0"),
        ("loss.label_smoothing=1", "loss.label_smoothing", "[0"),
        ("dataset.val_split=-1", "dataset.val_split", ""),
        ("dataset.subset=0", "dataset.subset", ""),
        ("trainer.device=tpu", "trainer.device", "auto, cpu, cuda, mps"),
        ("trainer.precision=fp8", "trainer.precision", "fp32, bf16"),
        ("model.activation=softsign", "model.activation", "relu"),
        ("model.init=xavier_magic", "model.init", "kaiming"),
        ("optimizer.lr=abc", "optimizer.lr", "Float"),
        ("trainer.epochs=2.5", "trainer.epochs", "Integer"),
        ("+optimizer.foo=1", "optimizer.foo", "momentum"),
        ("scheduler=step scheduler.step_size=0", "scheduler.step_size", ">= 1"),
        ("scheduler=cosine scheduler.warmup_epochs=10", "scheduler.warmup_epochs", "trainer.epochs"),
        ("model.name=vgg99", "model.name", "vgg11"),
    ],
)
def test_bad_values_name_the_key_and_the_valid_choices(override, key, expected):
    with pytest.raises(ConfigError) as info:
        run = validate(compose_config(*override.split()))
        prepare(run)
    message = str(info.value)
    assert key in message
    assert expected in message


def test_impossible_augmentation_fails_at_config_time():
    run = validate(compose_config("dataset=mnist", "trainer.device=cpu",
                                  "augmentation.ops=[{op: center_crop, size: 40}]"))
    with pytest.raises(ConfigError, match="center_crop"):
        prepare(run)


def test_cli_bad_value_is_one_clear_message_without_traceback(tmp_path):
    result = run_cnnlab("optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "optimizer.lr" in output and "> 0" in output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # a config refused before training leaves no run directory


def test_cli_bad_value_shows_the_traceback_when_debugging(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "-m", "cnnlab", "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" in result.stdout + result.stderr and "ConfigError: optimizer.lr" in result.stdout + result.stderr


def test_cli_unknown_group_option_lists_the_valid_ones(tmp_path):
    result = run_cnnlab("model=vgg99", cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "vgg99" in output
    for name in ("lenet", "vgg11", "resnet18"):
        assert name in output
