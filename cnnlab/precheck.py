"""Before Hydra starts: compose every job of the command line and check it, so that bad input is
one paragraph and exit status 2, and nothing runs or is written.

Hydra itself reports its composition errors (an unknown option, an unknown key, an override it
cannot parse) with exit status 1 and text that may not name the valid choices; a sweep would meet
a bad job only when its turn came, after the jobs before it had trained. Here each job's overrides
(the command line, and a preset's `hydra.sweeper.params`, expanded as Hydra's basic sweeper does)
are composed with Hydra's compose API and validated as the run will validate them; a sweep's
`report.facet` must name keys that vary. A search (hydra/sweeper=optuna) has its settings and its
search expressions checked, and jobs at both ends of every interval and with every choice. Other
sweepers and command lines with Hydra flags other than -m are left to Hydra.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import ConfigError
from cnnlab.config import config_dir, validate
from cnnlab.rerun import check_rerun
from cnnlab.fused.settings import LAUNCHER_TARGET, FusedSettings
from cnnlab.search.settings import SWEEPER_TARGET, SearchSettings
from cnnlab.search.space import GRAMMAR, parse_space

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OWN_VAL_SPLIT = ("image_folder", "custom")  # datasets whose files (or code) may hold a validation split
MAX_SHOWN = 5  # failing jobs listed in the message; the rest are counted


def check_command_line(argv: list[str], check_job: Callable[[DictConfig], None] | None = None) -> list[list[str]]:
    """Every job's overrides, after checking each; ConfigError naming what is wrong otherwise."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in overrides):
        return []  # Hydra's own flags (--cfg, --help, --config-dir ...): Hydra handles the command line
    with _hydra():
        base = _compose(overrides if not multirun else _without_sweeps(overrides))
        jobs = _jobs(base, overrides) if multirun else [overrides]
        if multirun and jobs is None:
            return []  # another sweeper: it knows its own search space
        check = check_job or validate
        if base.hydra.launcher.get("_target_") == LAUNCHER_TARGET:  # checked also where a single run ignores it
            FusedSettings.from_config(base.hydra.launcher)  # hydra/launcher=fused's settings
        if multirun and base.hydra.sweeper.get("_target_") == SWEEPER_TARGET:
            check = _search_check(check)
        failures, tasks = [], []
        for number, job in enumerate(jobs):
            try:
                tasks.append(_task(_compose(job)))
                check(tasks[-1])
            except ConfigError as err:
                failures.append((number, job, str(err)))
        if multirun and not failures:
            _check_facets(base, jobs)
            if base.hydra.sweeper.get("_target_") == BASIC_SWEEPER:  # a search checks its own study's command
                check_rerun(_sweep_dir(base), jobs, naming_keys(jobs), lambda n: validate(tasks[n]).to_dict())
    if failures:
        raise ConfigError(_message(failures, len(jobs), multirun))
    return jobs


def _sweep_dir(base: DictConfig) -> Path | None:
    """The sweep directory Hydra will use, where its jobs' directories are cnnlab's (rundir.job_dir); None where
    that is not known (a resolver only Hydra's run has, or the user's own hydra.sweep.subdir)."""
    sweep = OmegaConf.to_container(base.hydra.sweep, resolve=False)
    if sweep.get("subdir") != "${cnnlab.job_dir:${hydra.job.num}}":
        return None
    try:
        return Path(str(OmegaConf.select(base, "hydra.sweep.dir", throw_on_resolution_failure=True)))
    except Exception:  # noqa: BLE001 - not resolvable before Hydra runs: a new directory, nothing to check
        return None


def naming_keys(jobs: list[list[str]]) -> list[str] | None:
    """The keys that name a sweep's job directories (rundir.job_dir_name): those that vary, or None for a sweep
    of one job, named by all its overrides."""
    return varying_keys(jobs) if len(jobs) > 1 else None


def compose_job(overrides: list[str]) -> DictConfig:
    """One job's config, as a run gets it (Hydra's own node left out); ConfigError for bad overrides."""
    with _hydra():
        return _task(_compose(overrides))


@contextmanager
def _hydra() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield


def _compose(overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise ConfigError(_missing_option(str(err))) from None
    except OverrideParseException as err:
        raise ConfigError(_unparsable(overrides, str(err))) from None
    except ConfigCompositionException as err:
        raise ConfigError(_unknown_key(overrides, str(err))) from None


def _task(cfg: DictConfig) -> DictConfig:
    """The job's config as the run gets it: without Hydra's own node."""
    task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    task.pop("hydra", None)
    return task


def _without_sweeps(overrides: list[str]) -> list[str]:
    parser = OverridesParser.create()
    kept = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:  # parse_override raises the base class for a syntax error
            raise ConfigError(_unparsable([text], str(err))) from None
        if override.is_sweep_override() and override.is_hydra_override():
            raise ConfigError(f"{text}: Hydra's own settings (hydra.* and hydra/...) take one value per command, as one "
                              f"command has one launcher and one sweep directory; give one value, and run one "
                              f"command per value, each with its own hydra.sweep.dir")
        if not override.is_sweep_override():
            kept.append(text)
    return kept


def _jobs(base: DictConfig, overrides: list[str]) -> list[list[str]] | None:
    """The jobs Hydra's basic sweeper makes of the preset's sweeper.params and the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = base.hydra.sweeper
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    if sweeper.get("_target_") == SWEEPER_TARGET:  # a search: its settings, expressions and extremes
        settings = SearchSettings.from_config(sweeper)
        space = parse_space(params + overrides)
        if settings.sampler == "grid":
            space.grid()
        return space.check_jobs()
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(params + overrides)
    except OverrideParseException as err:
        raise ConfigError(_unparsable(params + overrides, str(err))) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _search_check(check_job: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """A search's job also needs a validation split: trials are scored and pruned on it. (Image folders
    and a user's data may bring their own val split; a run without one records no metric, and its
    trial fails with that said.)"""
    def check(cfg: DictConfig) -> None:
        check_job(cfg)
        dataset = validate(cfg).dataset
        if not dataset.val_split and dataset.name not in OWN_VAL_SPLIT:
            raise ConfigError("dataset.val_split=0 leaves the search nothing to score trials on: hydra/sweeper=optuna "
                              "ranks and prunes trials by their validation metric; hold out a validation split, "
                              "e.g. dataset.val_split=0.1")

    return check


def varying_keys(jobs: list[list[str]]) -> list[str]:
    """The keys (or config groups) the jobs of a sweep set to more than one value, in command-line order."""
    parser = OverridesParser.create()
    values: dict[str, set[str]] = {}
    for job in jobs:
        for text in job:
            override = parser.parse_override(text)
            values.setdefault(override.key_or_group, set()).add(str(override.value()))
    return [key for key, seen in values.items() if len(seen) > 1]


def _check_facets(base: DictConfig, jobs: list[list[str]]) -> None:
    """report.facet names keys that vary across the sweep (as the report will need them)."""
    facets = list(OmegaConf.select(base, "report.facet", default=[]) or [])
    if not facets:
        return
    keys = varying_keys(jobs)
    names = set(keys) | {k.rsplit(".", 1)[-1] for k in keys} | {k.removesuffix(".name") for k in keys}
    unknown = [f for f in facets if f not in names]
    if unknown:
        raise ConfigError(f"report.facet={facets}: {', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not "
                          f"vary in this sweep; facet by one of the keys that vary: {', '.join(keys) or 'none'}")


def _message(failures: list[tuple[int, list[str], str]], jobs: int, multirun: bool) -> str:
    if not multirun:
        return failures[0][2]
    def described(job: list[str]) -> str:  # what the user chose, not where Hydra writes
        return " ".join(o for o in job if not o.lstrip("+~").startswith(("hydra.", "hydra/")))

    hint = ("; interval() gives floats, int(interval(low, high)) integers"
            if any("to Integer" in err for _, _, err in failures) else "")
    if len(failures) > 1 and len({err for _, _, err in failures}) == 1:  # one cause: said once
        which = "all" if len(failures) == jobs else f"{len(failures)} (jobs {', '.join(str(n) for n, _, _ in failures)})"
        return f"{which} of the {jobs} jobs of this sweep have this config error, so none was started: {failures[0][2]}{hint}"
    shown = "; ".join(f"job {n} ({described(job)}): {err}" for n, job, err in failures[:MAX_SHOWN])
    more = f"; and {len(failures) - MAX_SHOWN} more" if len(failures) > MAX_SHOWN else ""
    verb = "has" if len(failures) == 1 else "have"
    return (f"{len(failures)} of the {jobs} jobs of this sweep {verb} a config error, so none was started: "
            f"{shown}{more}{hint}")


# ------------------------------------------------------------------------------- Hydra's errors, reworded


def _missing_option(text: str) -> str:
    found = re.search(r"Could not find '([^']+)'", text)
    if not found:
        return " ".join(text.split())
    group, _, name = found.group(1).rpartition("/")
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    return (f"{group}={name} is not a {group} config; choose one of: {', '.join(options)}"
            if options else f"{group}={name}: there is no {group} config of that name")


def _unparsable(overrides: list[str], text: str) -> str:
    reason = text.splitlines()[0] if text else "not valid"
    for override in overrides:
        try:
            OverridesParser.create().parse_override(override)
        except HydraException:
            key, _, value = override.lstrip("+~").partition("=")
            if re.match(r"\s*(tag|interval|range|choice|int|float)\(", value):  # a sweep or search expression
                return (f"{override!r} is not a valid override of {key}: {reason}. Sweep and search expressions are "
                        f"{GRAMMAR} (see https://hydra.cc/docs/advanced/override_grammar/extended/)")
            return (f"{override!r} is not a valid override of {key}: {reason}. Values with brackets, commas, quotes "
                    f"or spaces need quoting as a whole, e.g. '{key}=[1,2]' (see "
                    f"https://hydra.cc/docs/advanced/override_grammar/basic/)")
    return f"the command line is not valid: {reason}"


def _unknown_key(overrides: list[str], text: str) -> str:
    found = re.search(r"Could not override '([^']+)'", text)
    if not found:
        return " ".join(text.split())
    key = found.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
    try:
        node = OmegaConf.select(_compose(rest), parent) if parent else None
    except ConfigError:
        node = None
    if isinstance(node, DictConfig):
        owner = f"{parent} '{node.get('name')}'" if node.get("name") else parent
        valid = ", ".join(str(k) for k in node.keys())
        return f"{key} is not a key of {owner}; valid keys: {valid}"
    return f"{key} is not a key of this config"
