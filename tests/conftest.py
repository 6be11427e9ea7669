"""Shared helpers: run the real CLI in a subprocess, compose configs in-process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cnnlab.config import config_dir

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# a user's model (fragile.Fragile, written to a test's directory) that raises in training when fragile=1
FRAGILE = '''
import torch
from torch import nn

class Fragile(nn.Module):
    """Breaks in training when fragile=1: a trial that raises."""
    def __init__(self, in_channels: int, num_classes: int, fragile: int = 0) -> None:
        super().__init__()
        self.fragile, self.head = fragile, nn.Linear(in_channels * 16 * 16, num_classes)
    def forward(self, x):
        if self.fragile and self.training:
            raise RuntimeError("the fragile model broke")
        return self.head(x.flatten(1))
'''


def run_cnnlab(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m cnnlab ARGS` in cwd, as a user would run it; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def config_options(group: str) -> list[str]:
    """Every option file of a config group, e.g. config_options("model") -> ["lenet", ...]."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


@pytest.fixture
def empty_data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root
