"""`python -m cnnlab [overrides]` and the `cnnlab` console script: compose, validate, fit."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.checks import ConfigError
from cnnlab.config import validate
from cnnlab.report import write_summary
from cnnlab.train import fit

log = logging.getLogger("cnnlab")


def config_dir() -> str:
    """conf/ ships inside the installed package; in a source checkout it sits beside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"cnnlab's config tree (conf/config.yaml) is missing next to {here}; reinstall cnnlab")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    try:
        summary = fit(validate(cfg), run_dir, overrides)
    except ConfigError as err:
        log.error("%s", err)
        if not (run_dir / "summary.json").exists():  # fit() records its own failures
            write_summary(run_dir, {"status": "failed", "error": f"ConfigError: {err}", "overrides": overrides})
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the job is marked failed; the sweep's other jobs still run
        sys.exit(2)
    log.info("run directory: %s", run_dir.resolve())
    return summary.get("best_val_acc")  # the value a sweeper would optimise


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
