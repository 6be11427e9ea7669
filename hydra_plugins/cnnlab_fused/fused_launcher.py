"""`hydra/launcher=fused`: Hydra finds plugins only under the hydra_plugins package, so the class lives
here; the work is in cnnlab/fused/. Importing this module is cheap (Hydra imports every plugin at
start-up, for every run): torch and the training code load only when a sweep launches."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class FusedLauncher(Launcher):
    """Hydra's Launcher interface around cnnlab.fused.launcher.launch; settings: conf/hydra/launcher/fused.yaml."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from cnnlab.fused.launcher import launch
        from cnnlab.fused.settings import FusedSettings

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launch(FusedSettings.from_config(self.settings), self.hydra_context, self.task_function, self.config,
                      job_overrides, initial_job_idx)
