"""`python -m cnnlab.report DIR [DIR ...]` (or `cnnlab report ...`): compare a sweep or any set of runs."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from cnnlab.checks import ConfigError
from cnnlab.cli import Parser, fail
from cnnlab.report.compare import write_report
from cnnlab.report.sweep import RANK_METRICS

PROG = "cnnlab report"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(
        prog=PROG,
        description="Compare runs: a ranked table (csv + markdown) of the parameters that varied and the results, "
                    "overlaid curves, test accuracy bars and confusion matrices.",
    )
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="a sweep directory, run directories, or folders holding runs (searched recursively)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the report goes; default: the directory given, or outputs/reports/<time> for several")
    parser.add_argument("--metric", default="test_acc", choices=list(RANK_METRICS), help="rank runs by this (default test_acc)")
    parser.add_argument("--facet", nargs="*", default=[], metavar="KEY",
                        help="varied keys that get one row of panels each, e.g. --facet activation loss")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = args.out or (args.dirs[0] if len(args.dirs) == 1
                           else Path("outputs/reports") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        facet = [key for item in args.facet for key in item.split(",") if key]  # accept a,b as well as a b
        report = write_report(args.dirs, out, metric=args.metric, facet=facet)
    except ConfigError as err:
        return fail(PROG, err)
    print(f"{len(report.table)} runs compared; varied: {', '.join(report.keys) or 'nothing'}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {(report.out / 'sweep_summary.md').resolve()}")
    if len(args.dirs) == 1:
        _search_findings(args.dirs[0])
    return 0


def _search_findings(sweep_dir: Path) -> None:
    """A search's own report too, when the directory is a hydra/sweeper=optuna sweep (its multirun.yaml says)."""
    from omegaconf import OmegaConf

    from cnnlab.report.search import print_search_findings
    from cnnlab.search.settings import SWEEPER_TARGET

    saved = sweep_dir / "multirun.yaml"
    config = OmegaConf.load(saved) if saved.is_file() else None
    if config is not None and OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER_TARGET:
        print_search_findings(sweep_dir, config.hydra.sweeper, int(OmegaConf.select(config, "trainer.epochs")))


if __name__ == "__main__":
    sys.exit(main())
