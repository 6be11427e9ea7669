"""Checkpoints and other run files, written atomically.

A file is written to a temporary name in the same directory, fsynced, then renamed over the
target with os.replace, so a crash mid-save leaves the previous version intact and loadable.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlab.checks import ConfigError

FORMAT_VERSION = 2  # 2: RNG states as tensors and plain values (weights_only), a tensor checksum


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the user's to fix, not a bug


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it: the previous version stays whole
    until the new one is. A full disk is a ConfigError saying so (exit 2), the previous version intact."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _full(path, err) if err.errno in FULL else err
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run outputs are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL:
            raise _full(path, err) from None
        raise


def _full(path: Path, err: OSError) -> ConfigError:
    return ConfigError(f"no room on the disk to write {path} ({err.strerror}); its previous version is intact. "
                       f"Free some space, then continue the run with trainer.resume=<its run directory>")


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files atomic writes in `folder` left when their process was killed
    mid-write (a checkpoint's can be as large as the checkpoint). Only for a folder this process owns."""
    removed = sorted(Path(folder).glob(".*.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues the same random streams. Only tensors
    and plain values: numpy's state tuple is stored as a dict whose keys array is a tensor, so the
    checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Put every RNG back where rng_state() found it.

    RNG states are CPU byte tensors whatever the device; a checkpoint loaded with
    map_location=cuda has moved them, so they come back to the CPU first.
    """
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # weights_only loading gives lists back as lists
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if data_generator is not None and state.get("data") is not None:
        data_generator.set_state(state["data"].cpu())


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint, with its place, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}")


def checksum(state: dict[str, Any]) -> int:
    """CRC-32 over every tensor's place, dtype, shape and bytes: a flipped bit or a swapped tensor
    changes it (a truncated file does not even unpickle)."""
    crc = 0
    for where, tensor in _tensors({k: v for k, v in state.items() if k != "checksum"}):
        t = tensor.detach().cpu().contiguous()
        crc = zlib.crc32(f"{where} {t.dtype} {tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def save_checkpoint(path: Path, **state: Any) -> None:
    """Save model/optimizer/scheduler state dicts, counters, RNG states and config atomically, with
    the checksum of their tensors."""
    state = {"format_version": FORMAT_VERSION, **_own_storage(state)}
    buffer = io.BytesIO()
    torch.save({**state, "checksum": checksum(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _own_storage(obj: Any) -> Any:
    """Tensors that view a larger storage copied out: torch.save writes a tensor's whole storage, and a
    fused group's member holds its weights and optimizer state as rows of the group's buffers (fused/flat.py,
    fused/optim.py)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        return {k: _own_storage(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_own_storage(v) for v in obj)
    return obj


def _refused(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path} {why}; it was not loaded. Give a checkpoint a cnnlab run wrote "
                       f"(<run dir>/checkpoints/last.pt or best.pt)")


def _unpickle(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    """torch.load with weights_only=True: tensors and plain values only, so no file can run code.
    A format-1 checkpoint also holds numpy and schedule-config objects; a second try allows exactly
    those (data, no code), and keeps the result only if it is a format-1 checkpoint."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - pickle, zip, EOF and storage errors for damaged files
        if not (isinstance(err, pickle.UnpicklingError) and re.search(r"GLOBAL [\w.]+", str(err))):
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))  # past torch's advice to load unsafely
            detail = detail.group(1) if detail else (str(err).splitlines() or [""])[0]
            raise _refused(path, f"is not a readable checkpoint: it is truncated or corrupted, or not written by "
                                 f"cnnlab ({type(err).__name__}: {detail})") from None
        first = err  # the weights-only unpickler met a global it does not allow
    try:
        with torch.serialization.safe_globals(_format1_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001
        ckpt = None
    if not (isinstance(ckpt, dict) and ckpt.get("format_version") == 1):
        named = re.search(r"GLOBAL ([\w.]+)", str(first)).group(1)
        raise _refused(path, f"holds objects other than tensors and plain values (it names {named}), which could run code")
    return ckpt


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A cnnlab checkpoint, checked; anything else (missing, truncated, corrupted, another program's
    file, a crafted one) is a ConfigError, and nothing in the file is run.

    mmap=True maps the tensors instead of reading them, and skips the checksum (which would read
    them all): cheap when only the config is wanted.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    ckpt = _unpickle(path, map_location, mmap)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise ConfigError(f"{path} is not a cnnlab checkpoint (it has no format_version)")
    if ckpt["format_version"] not in (1, FORMAT_VERSION):
        raise ConfigError(f"{path}: checkpoint format {ckpt['format_version']} is not a format "
                          f"(1, {FORMAT_VERSION}) this cnnlab reads; use the cnnlab version that wrote it")
    if ckpt["format_version"] == 1:
        return _upgrade(ckpt)
    if not mmap and ckpt.get("checksum") != checksum(ckpt):
        raise ConfigError(f"{path} is corrupted: its tensors do not match the checksum written with them "
                          f"(a damaged disk or copy). Resume from another checkpoint of the run "
                          f"(checkpoints/best.pt or last.pt), or start the run again")
    return ckpt


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (no checksum, numpy RNG state as a tuple) in format-2 form."""
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return ckpt


def _format1_globals() -> list[Any]:
    """What format-1 checkpoints hold besides tensors: numpy's RNG state (numpy's array and dtype
    reconstruction: data, no code) and the schedule's config dataclasses (plain fields)."""
    from cnnlab.optim import SCHEDULERS  # here: checkpoint.py is below the config schemas

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *SCHEDULERS.values()]
