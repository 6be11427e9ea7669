"""The Optuna sweeper's body (hydra_plugins/cnnlab_search holds the Hydra class): settings and search
space from the config and command line, jobs through whatever launcher the sweep uses."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError, Refused
from cnnlab.interrupt import Interrupted
from cnnlab.search.settings import SearchSettings
from cnnlab.search.space import parse_space
from cnnlab.search.study import Search

log = logging.getLogger("cnnlab")


def run_sweep(config: DictConfig, launcher: Any, params: dict[str, str], settings: dict[str, Any],
              arguments: list[str]) -> list[Any]:
    """Run the search; bad settings or a study that searched something else refuse it (exit status 2)."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    returns: list[Any] = []

    def launch(overrides: Sequence[Sequence[str]], first: int) -> list[Path | None]:
        results = launcher.launch([list(o) for o in overrides], initial_job_idx=first)
        returns.extend(results)
        return [_output_dir(r) for r in results]

    def opened() -> None:  # once the study is known to be this command's, not before (a refused re-run)
        sweep_dir.mkdir(parents=True, exist_ok=True)  # a database storage made no file in it yet
        OmegaConf.save(config, sweep_dir / "multirun.yaml")  # as Hydra's own sweepers do; `cnnlab report` reads it

    try:
        search = Search(SearchSettings.from_config(settings),
                        parse_space([f"{k}={v}" for k, v in (params or {}).items()] + arguments),
                        sweep_dir, int(OmegaConf.select(config, "trainer.epochs", default=1)))
        search.run(launch, search.settings.n_jobs or launcher_parallelism(config.hydra.launcher), opened)
    except ConfigError as err:
        raise Refused(str(err)) from None
    # an interrupt a launcher returns as a job's outcome ends the search, as in a grid (cnnlab's own task function
    # raises it past Hydra's run_job: SystemExit on the command line, KeyboardInterrupt from Python)
    for result in returns:
        if result.status == JobStatus.FAILED:
            try:
                result.return_value
            except (Interrupted, KeyboardInterrupt):
                raise
            except Exception:  # a job's own failure is its trial's, recorded in the study already
                pass
    return returns


def launcher_parallelism(launcher: DictConfig) -> int:
    """Trials asked for at once when hydra.sweeper.n_jobs is null: as many as the launcher runs at once."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target:
        import joblib  # installed with the joblib launcher plugin, the only way to get here

        return max(1, joblib.effective_n_jobs(int(launcher.get("n_jobs", -1))))
    if "submitit" in target:
        return max(1, int(launcher.get("array_parallelism", 1)))
    return 1


def _output_dir(result: Any) -> Path | None:
    try:
        return Path(str(result.hydra_cfg.hydra.runtime.output_dir))
    except AttributeError:  # the launcher returned no config for it: it never got a directory
        return None
