"""Shell completion (`eval "$(cnnlab -sc install=bash)"`, Hydra's): the subcommands and their keys are
completed here; a training command line is Hydra's to complete. Nothing here prints an error: a
half-typed line is what completion is for."""
from __future__ import annotations

import importlib
from collections.abc import Mapping


def complete(line: str, subcommands: Mapping[str, str]) -> tuple[list[str], bool]:
    """(words that complete `line`'s last word, whether Hydra should add its own) for COMP_LINE `line`."""
    words = line.split()
    current = "" if line.endswith(" ") or len(words) < 2 else words[-1]
    position = len(words) if line.endswith(" ") else len(words) - 1  # the index of the word being typed
    if position <= 1:  # the first argument: a subcommand, a flag, or the start of a training line
        choices = [*subcommands, "--help", "--version"]
        return [c for c in choices if c.startswith(current)], not current.startswith("-")
    if words[1] not in subcommands:
        return [], True
    module = importlib.import_module(subcommands[words[1]])
    keys = [f"{k.removesuffix('.<key>')}." if k.endswith(".<key>") else f"{k}=" for k in getattr(module, "KEYS", {})]
    keys += list(getattr(module, "OPTIONS", ()))
    return [k for k in keys if k.startswith(current)], False
