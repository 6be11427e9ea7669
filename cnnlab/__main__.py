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
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        summary = fit(validate(cfg), run_dir, overrides)
    except Exception as err:
        if not (run_dir / "summary.json").exists():  # fit() records its own failures
            write_summary(run_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}", "overrides": overrides})
        if isinstance(err, ConfigError):
            log.error("%s", err)  # bad input: one clear message, no traceback
        elif multirun:
            log.exception("job failed")
        else:
            raise  # a bug, not bad input: keep the traceback
        if multirun:
            return None  # recorded in summary.json; the other jobs run, SweepStatus reports it
        sys.exit(2)
    log.info("run directory: %s", run_dir.resolve())
    return summary.get("best_val_acc")  # the value a sweeper would optimise


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
