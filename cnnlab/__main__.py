"""`python -m cnnlab [overrides]` and the `cnnlab` console script: compose, validate, fit."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab import distributed, usercode
from cnnlab.checks import ConfigError, Refused
from cnnlab.completion import complete
from cnnlab.config import config_dir
from cnnlab.interrupt import Interrupted
from cnnlab.job import checked_command_line, continue_command, run_job
from cnnlab.launch import missing_launcher_message

log = logging.getLogger("cnnlab")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run_job(cfg)
    except Interrupted as err:  # checkpointed at a step boundary; status: interrupted is in summary.json
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        program = distributed.command_prefix(distributed.world_from_env())
        command = continue_command(run_dir, hydra_cfg.mode == RunMode.MULTIRUN, program)
        log.warning("%s%s. Continue with: %s", err, "" if err.finished else ": checkpoint saved", command)
        sys.exit(err.exit_code)
    except ConfigError as err:  # bad input to a single run: one clear message, exit 2
        # the traceback only when debugging (Hydra's own switch)
        log.error("%s", err, exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
        sys.exit(2)
    return summary.best_val_acc if summary else None  # the value a sweeper would optimise


# subcommand -> the module whose main(argv) -> exit status runs it; imported only when named,
# so training and `cnnlab --help` never load what the subcommands need (pandas, ...)
SUBCOMMANDS = {
    "models": "cnnlab.models.__main__",
    "report": "cnnlab.report.__main__",
    "evaluate": "cnnlab.evaluate",
    "predict": "cnnlab.predict",
}


USAGE = """cnnlab: train convolutional networks from configs.

  cnnlab [key=value ...]               train one run (cnnlab -m ... runs a sweep of comma lists)
  cnnlab models [key=value ...]        the model zoo's sizes, or one model's card for these overrides
  cnnlab report DIR [DIR ...]          compare runs and sweeps: tables, plots, sweep_summary.md
  cnnlab evaluate run=DIR [...]        score a run's checkpoint on a test set
  cnnlab predict run=DIR images=...    classify image files with a trained run
  cnnlab <subcommand> --help           that subcommand's arguments
  cnnlab --version                     the installed cnnlab's version

The training command line is Hydra's:"""


def main() -> None:
    """`cnnlab [overrides]` trains; `cnnlab models ...` lists the model zoo; `cnnlab report DIR` compares runs;
    `cnnlab evaluate run=DIR` scores a checkpoint on a test set; `cnnlab predict run=DIR images=...` classifies images."""
    usercode.export_cwd()  # the user's modules (model._target_=mynet.TinyVGG) import here and in every worker
    if sys.argv[1:2] == ["--version"]:  # cnnlab's, not Hydra's
        from cnnlab import __version__

        print(f"cnnlab {__version__}")
        sys.exit(0)
    if sys.argv[1:2] in (["--help"], ["-h"]):  # the subcommands first, then Hydra's own help
        print(USAGE)
    if {"-sc", "--shell-completion"} & set(sys.argv) and any(a.startswith("query=") for a in sys.argv):
        words, hydra_too = complete(os.environ.get("COMP_LINE", ""), SUBCOMMANDS)
        print(" ".join(words))
        if not hydra_too:  # a subcommand's line: Hydra would only misread it as overrides
            sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    message = missing_launcher_message(sys.argv[1:])
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)
    try:
        argv = checked_command_line(sys.argv[1:], os.environ)
        sys.argv[1:] = distributed.rank_argv(argv, distributed.world_from_env())
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the traceback, when debugging
            traceback.print_exc()
        print(err, file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    except Refused as err:  # a Hydra callback refused the run before it began
        print(err.message, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C (abort at once), or one between a sweep's jobs: no traceback
        print("stopped by Ctrl-C, without waiting for a checkpoint. A run goes on from its last checkpoint with "
              "trainer.resume=<its run directory> (one stopped before its first checkpoint starts over there); a sweep "
              "goes on when its command is run again with its hydra.sweep.dir", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
