"""cnnlab from Python and notebooks: the same runs as the command line, as objects.

    import cnnlab
    run = cnnlab.train("model=vgg11", "dataset=cifar10", "trainer.epochs=5")  # the CLI's overrides
    run.status, run.dir, run.summary["test_acc"], run.metrics                 # metrics: a DataFrame
    run = cnnlab.train("dataset=cifar10", model=MyNet)                         # your class, or an instance
    sweep = cnnlab.sweep("optimizer.lr=0.1,0.01", "model.activation=relu,tanh")  # .runs, .table, .best
    old = cnnlab.load_run("outputs/runs/...")                                  # a Run, from its directory

Decisions:
- Hydra runs the job exactly as `python -m cnnlab` does (same config tree, callbacks, run and sweep
  directories, train.log, launchers): its app object is made here for each call and Hydra's global
  state is cleared before and after, so calls repeat in one process. sys.argv and the working
  directory are not touched; the logging set-up Hydra installs for a job is undone afterwards.
- Bad input raises cnnlab.ConfigError with the CLI's message; a finished run is returned whatever its
  status (diverged, stuck) and a run that broke raises what broke it. Ctrl-C (interrupting the
  kernel) checkpoints at a step boundary and raises KeyboardInterrupt naming the call that continues.
- `model=` hands a class or an nn.Module instance over in this process: the run is `model=custom`
  with `model._target_` set to where the class says it lives (`__main__.MyNet` for a notebook's),
  so the run and its checkpoints are complete. An instance is copied for each run (its own initial
  weights; trainer.seed does not re-draw them); a class is called like `model._target_`'s.
  Parallel launchers run jobs in other processes, which cannot see such an object: name a module.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab import rundir, usercode
from cnnlab.checks import ConfigError, Refused
from cnnlab.config import config_dir
from cnnlab.interrupt import Interrupted
from cnnlab.job import checked_command_line, run_job
from cnnlab.notebook import show_figures_inline

log = logging.getLogger("cnnlab")


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Run:
    """A run directory, read fresh from its files on every access."""

    dir: Path

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / "summary.json").read_text())

    @property
    def status(self) -> str:
        return self.summary["status"]

    @property
    def metrics(self) -> Any:
        """metrics.csv as a pandas DataFrame, one row per epoch (empty before the first epoch ends)."""
        import pandas as pd

        from cnnlab.report import METRIC_COLUMNS

        path = self.dir / "metrics.csv"
        return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(METRIC_COLUMNS))

    @property
    def config(self) -> dict[str, Any]:
        """The run's whole resolved config, as summary.json records it."""
        return self.summary["config"]

    def plot(self) -> Any:
        """Loss and accuracy curves (a matplotlib Figure; shows inline in a notebook)."""
        from cnnlab.report.run import curves_figure, test_curve_note

        summary, config = self.summary, self.config
        error = (config.get("viz") or {}).get("curves") == "error"
        tested = (config.get("trainer") or {}).get("test_every_epoch")
        return curves_figure(self.metrics, f"{summary.get('model') or ''} on {summary.get('dataset') or ''}", error,
                             test_curve_note(summary.get("best_epoch")) if tested else "")

    def confusion(self) -> Any:
        """The test confusion matrix (a matplotlib Figure); ConfigError before the run has one."""
        import pandas as pd

        from cnnlab.report.run import confusion_figure

        path = self.dir / "confusion_matrix.csv"
        if not path.is_file():
            raise ConfigError(f"{self.dir} has no confusion_matrix.csv yet (status {self.status}); it is written "
                              f"when the run is scored on its test set")
        frame = pd.read_csv(path, index_col=0)
        return confusion_figure(frame.to_numpy(), [str(c) for c in frame.columns])

    def model(self, model: Any = None, checkpoint: str = "best", device: str | None = None) -> Any:
        """The trained network, weights loaded, in eval mode. A run of a class defined in a notebook needs
        that class (or an instance of it) again: `run.model(MyNet)`."""
        from cnnlab.inference import open_run

        target = (self.config.get("model") or {}).get("_target_")
        if model is not None and not target:
            raise ConfigError(f"{self.dir} trained cnnlab's {self.summary.get('model')}; call .model() without a class")
        with usercode.provide(target, model) if model is not None else nullcontext():
            return open_run(self.dir, checkpoint, device).model

    def __repr__(self) -> str:
        try:
            s = self.summary
        except (OSError, ValueError):
            return f"Run(dir={str(self.dir)!r}, no summary.json)"
        acc = s.get("test_acc")
        return (f"Run(status={s.get('status')!r}, model={s.get('model')!r}, dataset={s.get('dataset')!r}, "
                f"test_acc={acc if acc is None else round(acc, 4)}, dir={str(self.dir)!r})")


@dataclass(frozen=True)
class Sweep:
    """A sweep directory: its jobs' runs, in job order, and the comparison table."""

    dir: Path
    runs: list[Run]

    @property
    def table(self) -> Any:
        """sweep_summary.csv as a DataFrame, ranked by the report's metric (report.metric)."""
        import pandas as pd

        path = self.dir / "sweep_summary.csv"
        if not path.is_file():
            raise ConfigError(f"{self.dir} has no sweep_summary.csv; `cnnlab report {self.dir}` writes it")
        return pd.read_csv(path)

    @property
    def best(self) -> Run:
        """The run ranked first in the table."""
        first = str(self.table["run"].iloc[0])
        return next(r for r in self.runs if r.dir.name == first or str(r.dir).endswith(first))

    def __repr__(self) -> str:
        statuses = [r.status if (r.dir / "summary.json").is_file() else "unknown" for r in self.runs]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        return f"Sweep({len(self.runs)} runs: {counts}; dir={str(self.dir)!r})"


def load_run(path: str | os.PathLike) -> Run:
    """The Run of an existing run directory (one that has summary.json)."""
    run_dir = Path(path).expanduser()
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{path} is not a cnnlab run directory: it has no summary.json")
    return Run(run_dir.resolve())


# ------------------------------------------------------------------------------- running


def train(*overrides: str, model: Any = None, run_dir: str | os.PathLike | None = None) -> Run:
    """One run, as `python -m cnnlab OVERRIDES` would do it; `model`: your class or nn.Module instance;
    `run_dir`: its directory (default: a new one under outputs/runs/). Returns its Run."""
    args = _overrides(overrides, "train")
    rundir.forget_claims()  # a new call: a directory claimed by an earlier run in this process is not ours
    if run_dir is not None:
        args.append(f"hydra.run.dir={_quoted(Path(run_dir).expanduser().resolve())}")
    with _handed_over(model, args) as args:
        returned = _hydra(args, multirun=False)
    resume = _given(args, "trainer.resume")
    if resume:  # a resume continues in the run's own directory, wherever Hydra pointed
        from cnnlab.resume import resume_point

        return Run(resume_point(resume).run_dir.resolve())
    return Run(Path(returned.hydra_cfg.hydra.runtime.output_dir).resolve())


def sweep(*overrides: str, sweep_dir: str | os.PathLike | None = None, model: Any = None) -> Sweep:
    """A sweep, as `python -m cnnlab -m OVERRIDES` (comma lists, presets, launchers) would run it; jobs
    that fail are recorded (their Run says so), not raised. `sweep_dir`: its directory (default: a new
    one under outputs/sweeps/; an existing sweep's directory re-runs it in place, keeping finished jobs).
    Returns the Sweep with every job's Run, in job order."""
    from cnnlab.report.sweep import find_runs

    args = _overrides(overrides, "sweep")
    if model is not None and any(a.startswith("hydra/launcher=") and a != "hydra/launcher=basic" for a in args):
        raise ConfigError("a model handed over from Python trains only in this process, with the basic launcher; "
                          "for a parallel launcher name its module instead: model=custom model._target_=mynet.TinyVGG")
    rundir.forget_claims()
    # named here, not by Hydra's ${now}: two sweeps started in the same second get two directories
    name = _given(args, "name")  # a named sweep re-runs in place
    directory = Path(sweep_dir or (f"outputs/sweeps/{name}" if name else
                                   rundir.unique_dir(time.strftime("outputs/sweeps/%Y-%m-%d_%H-%M-%S"))))
    args.append(f"hydra.sweep.dir={_quoted(directory.expanduser().resolve())}")
    try:
        with _handed_over(model, args) as args:
            _hydra(["-m", *args], multirun=True)
    except ConfigError:
        rundir.release(directory)  # refused before any job: the directory made for it goes too
        raise
    runs = [Run(path.resolve()) for path in find_runs([directory])]
    return Sweep(directory.expanduser().resolve(), runs)


def _overrides(overrides: Sequence[str], call: str) -> list[str]:
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"cnnlab.{call}() takes overrides as strings like \"optimizer.lr=0.01\"; got {bad[0]!r}")
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ConfigError(f"cnnlab.{call}() takes overrides only, not command-line flags ({', '.join(flags)}); "
                          f"{'use cnnlab.sweep() for a sweep' if call == 'train' else 'comma lists make the sweep'}")
    return list(overrides)


def _quoted(path: Path) -> str:
    return shlex.quote(str(path)) if set(str(path)) & set(" ,=[]{}()'\"\\:") else str(path)


def _given(args: Sequence[str], key: str) -> str | None:
    """The value an override in `args` gives `key` (unquoted), or None."""
    value = next((a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")), None)
    return shlex.split(value)[0] if value and value[:1] in "'\"" else value


@contextmanager
def _handed_over(model: Any, args: list[str]) -> Iterator[list[str]]:
    """`model=` given from Python: the overrides that select it, while it is provided under its path."""
    if model is None:
        yield args
        return
    import torch

    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise ConfigError(f"model={model!r} is neither an nn.Module (class or instance) nor a function returning one")
    resume = _given(args, "trainer.resume")
    if resume:  # the run's own config names the model; hand the object over under that name
        from cnnlab.resume import resume_point

        target = (resume_point(resume).saved_config().get("model") or {}).get("_target_")
        if not target:
            raise ConfigError(f"trainer.resume={resume} trained one of cnnlab's models; resume it without model=")
        selected = args
    else:
        target = usercode.dotted_name(model)
        clashes = [a for a in args if a.lstrip("+~").split("=", 1)[0] in ("model", "model._target_", "model.name")]
        if clashes:
            raise ConfigError(f"model= is given from Python, so {', '.join(clashes)} cannot choose another model too")
        selected = ["model=custom", f"model._target_={target}", *args]
    with usercode.provide(target, model):
        yield selected


def _hydra(args: list[str], multirun: bool) -> Any:
    """Run Hydra's app on these overrides as the `cnnlab` command does; its global state is left clear."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    env: dict[str, str] = {}
    argv = checked_command_line(args, env)  # ConfigError: bad input, nothing written
    overrides = [a for a in argv if a not in ("-m", "--multirun")] + [f"hydra.mode={'MULTIRUN' if multirun else 'RUN'}"]
    usercode.export_cwd()
    show_figures_inline()
    version.setbase("1.3")
    GlobalHydra.instance().clear()
    try:
        app = Hydra.create_main_hydra2(task_name="train", config_search_path=create_config_search_path(config_dir()))
        with _environment(env), _logging_restored():
            if multirun:
                return app.multirun(config_name="config", task_function=_job, overrides=overrides)
            return app.run(config_name="config", task_function=_job, overrides=overrides)
    except Refused as err:
        raise ConfigError(err.message) from None
    except SystemExit as err:
        if not (multirun and err.code == 1):  # 1: jobs failed, which their own summary.json records
            raise
    finally:
        GlobalHydra.instance().clear()


def _job(cfg: Any) -> Any:
    """run_job, and on a stop the call that continues it (Hydra's own config is gone once it returns)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return run_job(cfg)
    except Interrupted as err:  # raised as KeyboardInterrupt, which Hydra's run_job does not catch: a sweep's
        hydra_cfg = HydraConfig.get()  # next jobs must not start (the CLI's sys.exit does the same)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            call = f"the same cnnlab.sweep(...) call with sweep_dir={str(Path(hydra_cfg.sweep.dir).resolve())!r}"
        else:
            call = f"cnnlab.train(\"trainer.resume={Path(hydra_cfg.runtime.output_dir).resolve()}\")"
        raise KeyboardInterrupt(f"{err}{'' if err.finished else ': checkpoint saved'}. Continue with {call}") from None


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """What the sweep's jobs read from the environment (as the CLI exports it), for this call only."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Hydra configures logging for each job (console and train.log); the caller's set-up comes back after."""
    root = logging.getLogger()
    handlers, level, ours = root.handlers[:], root.level, log.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()  # the job's train.log
        root.handlers[:] = handlers
        root.setLevel(level)
        log.setLevel(ours)
