"""Checkpoints and other run files, written atomically.

A file is written to a temporary name in the same directory, fsynced, then renamed over the
target with os.replace, so a crash mid-save leaves the previous version intact and loadable.
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.checks import ConfigError

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues the same random streams."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def save_checkpoint(path: Path, **state: Any) -> None:
    """Save model/optimizer/scheduler state dicts, counters, RNG states and config atomically."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def restore_rng(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Put every RNG back where rng_state() found it.

    RNG states are CPU byte tensors whatever the device; a checkpoint loaded with
    map_location=cuda has moved them, so they come back to the CPU first.
    """
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if data_generator is not None and state.get("data") is not None:
        data_generator.set_state(state["data"].cpu())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A cnnlab checkpoint; anything else (missing, truncated, another program's file) is a ConfigError.

    mmap=True maps the tensors instead of reading them: cheap when only the config is wanted.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the checkpoint also holds numpy/python RNG states; only load your own files.
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises pickle, zip and EOF errors for bad files
        raise ConfigError(f"{path} is not a readable checkpoint (truncated or not written by cnnlab): "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise ConfigError(f"{path} is not a cnnlab checkpoint (it has no format_version)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ConfigError(f"{path}: checkpoint format {ckpt['format_version']} is not the format {FORMAT_VERSION} "
                          f"this cnnlab reads; resume it with the cnnlab version that wrote it")
    return ckpt
