"""`hydra/sweeper=optuna`: Hydra finds plugins only under the hydra_plugins package, so the class lives
here; the work is in cnnlab/search/. Importing this module is cheap (Hydra imports every plugin at
start-up, for every run): Optuna and the training code load only when a search sweeps."""
from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Hydra's Sweeper interface around cnnlab.search.sweeper.run_sweep; settings: conf/hydra/sweeper/optuna.yaml."""

    def __init__(self, params: dict[str, str] | None = None, **settings: Any) -> None:
        self.params = dict(params or {})  # a preset's search space, key -> expression
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from cnnlab.search.sweeper import run_sweep

        assert self.config is not None, "setup() comes first"
        return run_sweep(self.config, self.launcher, self.params, self.settings, list(arguments))
