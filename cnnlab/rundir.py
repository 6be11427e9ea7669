"""Run directories: one run each, never shared.

The default `hydra.run.dir` goes through the `cnnlab.unique_dir` resolver: it claims the directory
by creating it (mkdir is atomic), and if another run has it already, takes `<dir>_2`, `<dir>_3`...,
so runs started in the same second (a shell loop with `&`) each get their own. A directory the user
names is used as named; a new run there is refused if it already holds a run (OutputDirCheck), and
a live run holds its directory with a lock (record.claim).

A sweep's jobs are named `<job number>_<key>-<value>_...` with the values this job sets of the keys
the sweep varies (cnnlab.job_dir): short, readable, in characters any file system and Hydra's
override grammar take, capped at JOB_NAME_LIMIT. The same command names the same directories, so
re-running a sweep finds its jobs again.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cnnlab.checks import under

RUN_FILES = ("summary.json", "metrics.csv", "checkpoints")  # any of them: the directory holds a run
_claimed: dict[str, str] = {}  # base -> the directory this process claimed (a resolver may be asked again)
_created: set[Path] = set()  # run directories this process made: the only ones `release` removes


def unique_dir(base: str) -> str:
    """`base`, or the first of `base_2`, `base_3`... that no other run has claimed; created here."""
    if base in _claimed:
        return _claimed[base]
    candidate, n = base, 1
    try:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                Path(candidate).mkdir()
                break
            except FileExistsError:
                n += 1
                candidate = f"{base}_{n}"
    except OSError:  # cannot be made: OutputDirCheck reports why, with the key to change
        return base
    _claimed[base] = candidate
    _created.add(Path(candidate).resolve())
    return candidate


def forget_claims() -> None:
    """A new run in this process (the Python API's next call): claim afresh, do not reuse the last one."""
    _claimed.clear()


def note_new(path: Path) -> None:
    """Before Hydra creates a run directory: remember it as this process's if it is not there yet."""
    path = Path(path).resolve()
    if not path.exists():
        _created.add(path)


def release(path: Path) -> bool:
    """Remove a run directory this process made, when the run was refused before it began: a config
    rejected before training leaves no directory behind. Returns whether it was removed."""
    path = Path(path).resolve()
    if path not in _created or holds_a_run(path):
        return False
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return True


def holds_a_run(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in RUN_FILES)


# ------------------------------------------------------------------------------- sweep jobs

SWEEP_KEYS_ENV = "CNNLAB_SWEEP_KEYS"  # the keys a sweep varies, set before Hydra starts (precheck)
SWEEP_COMMAND_ENV = "CNNLAB_SWEEP_COMMAND"  # the sweep's command line, to print how a stopped sweep goes on
JOB_NAME_LIMIT = 80  # characters: far below any file system's limit, short enough to read and type
# keys that never name a job: paths and settings that do not change results (as override_dirname's exclude_keys)
UNNAMED = ("name", "dataset.root", "dataset.loader", "dataset.num_workers", "trainer.device", "trainer.progress",
           "trainer.eval_batch_size", "report", "logger", "hydra")


def job_dir_name(num: int, overrides: list[str], varying: list[str] | None) -> str:
    """`<num>_<key>-<value>_...` for the values this job sets of the keys the sweep varies (all its
    overrides when that is not known), in characters safe everywhere: letters, digits, . _ -."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    pairs: list[tuple[str, str]] = []
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group.lstrip("+~")
        if (varying is not None and key not in varying) or under(key, UNNAMED):
            continue
        pairs.append((key, _safe(override.get_value_element_as_str())))
    names = _short_keys([k for k, _ in pairs])
    name = "_".join([str(num)] + [f"{names[k]}-{v}" for k, v in pairs])
    return name[:JOB_NAME_LIMIT].rstrip("_-.")


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", value).strip("-") or "none"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """optimizer.lr -> lr, model.activation -> activation, model -> model; the whole key where two clash."""
    def short(key: str) -> str:
        parts = key.removesuffix(".name").split(".")
        return parts[-1]

    counts = {s: sum(short(k) == s for k in keys) for s in map(short, keys)}
    return {k: short(k) if counts[short(k)] == 1 else k for k in keys}


def job_dir(num: Any) -> str:
    """The resolver behind hydra.sweep.subdir; Hydra has set the job's config when it asks."""
    from hydra.core.hydra_config import HydraConfig

    varying = os.environ.get(SWEEP_KEYS_ENV)
    overrides = list(HydraConfig.get().overrides.task)
    return job_dir_name(int(num), overrides, varying.split(",") if varying else None)


def output_subdir() -> str | None:
    """hydra.output_subdir: .hydra for a new run; None (Hydra writes no config files) where the run
    directory already holds a run, which a resume or a sweep's re-run continues or keeps as it is."""
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.get("output_dir")
    return None if output_dir and holds_a_run(Path(output_dir)) else ".hydra"


def named(name: Any, default: str) -> str:
    """The run's `name=` where one is given, else the timestamped default (the run or sweep directory)."""
    return default if name in (None, "") else str(name)


def register_resolvers() -> None:
    """The resolvers conf/config.yaml's hydra section uses."""
    for name, resolver, cache in (("cnnlab.unique_dir", unique_dir, True), ("cnnlab.job_dir", job_dir, False),
                                  ("cnnlab.output_subdir", output_subdir, False), ("cnnlab.named", named, False)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cache)
