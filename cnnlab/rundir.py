"""Run directories: one run each, never shared.

The default `hydra.run.dir` goes through the `cnnlab.unique_dir` resolver: it claims the directory
by creating it (mkdir is atomic), and if another run has it already, takes `<dir>_2`, `<dir>_3`...,
so runs started in the same second (a shell loop with `&`) each get their own. A directory the user
names is used as named; a new run there is refused if it already holds a run (OutputDirCheck), and
a live run holds its directory with a lock (record.claim).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.checks import unwritable_reason

RUN_FILES = ("summary.json", "metrics.csv", "checkpoints")  # any of them: the directory holds a run
_claimed: dict[str, str] = {}  # base -> the directory this process claimed (a resolver may be asked again)
_created: set[Path] = set()  # run directories this process made: the only ones `release` removes


def unique_dir(base: str) -> str:
    """`base`, or the first of `base_2`, `base_3`... that no other run has claimed; created here."""
    if base in _claimed:
        return _claimed[base]
    if unwritable_reason(Path(base)):  # OutputDirCheck reports it, with the key to change
        return base
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            Path(candidate).mkdir()
            break
        except FileExistsError:
            n += 1
            candidate = f"{base}_{n}"
    _claimed[base] = candidate
    _created.add(Path(candidate).resolve())
    return candidate


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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cnnlab.unique_dir"):
        OmegaConf.register_new_resolver("cnnlab.unique_dir", unique_dir, use_cache=True)
