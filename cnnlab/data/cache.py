"""Decoded images kept on disk under the dataset root, so only the first run pays for decoding."""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cnnlab.checks import ConfigError
from cnnlab.data.images import read_into

log = logging.getLogger("cnnlab")

CACHE_DIR = ".cnnlab-cache"  # under the dataset root; safe to delete at any time
_CACHE_VERSION = 1
_CHUNK = 4096  # images copied out of the cache at a time: bounds the temporary memory


class ImageCache:
    """The decoded uint8 images of one pool of files (a training pool, a test set), kept on disk.

    Files in `folder`: <stem>.npy, uint8 [N, C, H, W], filled as images are first decoded (a subset
    run stores only its images; a later run decodes only what is still missing), and <stem>.crc.npy,
    int64 [N], each stored image's CRC-32 (-1: not stored yet). The stem holds a hash of the file list
    with sizes and mtimes, channels, size and the Pillow version (the decoder), so changed files get a fresh
    cache. Every image read back is checked against its CRC and decoded again on a mismatch: a
    corrupted cache is rebuilt, never trusted; a cache left by an older version of the files is
    removed when the new one is made. A lock file keeps a sweep's parallel jobs from filling it at
    once (the second waits, then reads). An unwritable folder means no cache, with a log line.
    """

    def __init__(self, folder: Path, name: str, paths: Sequence[Path], channels: int, size: tuple[int, int]):
        self.folder, self.name = Path(folder), name
        self.paths = list(paths)
        self.channels, self.size = channels, tuple(size)
        self._stem: str | None = None

    def stem(self) -> str:
        """<name>-<H>x<W>-c<C>-<hash>; the hash stats every file once (about 1 s per 100k files)."""
        if self._stem is None:
            from importlib.metadata import version

            h = hashlib.sha256(f"v{_CACHE_VERSION} {self.channels} {self.size} "
                               f"pillow {version('pillow')}\n".encode())
            for path in self.paths:
                try:
                    st = os.stat(path)
                except OSError as err:
                    raise ConfigError(f"{path} cannot be read ({err}); it was listed a moment ago: "
                                      f"is the dataset being changed?") from None
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            height, width = self.size
            self._stem = f"{self.name}-{height}x{width}-c{self.channels}-{h.hexdigest()[:20]}"
        return self._stem

    def load(self, index: torch.Tensor | np.ndarray | Sequence[int], threads: int | None = None) -> torch.Tensor:
        """uint8 [len(index), C, H, W]: pool images at `index`, from the cache where stored and checked."""
        index = np.asarray(index, dtype=np.int64)
        out = torch.empty(len(index), self.channels, *self.size, dtype=torch.uint8)
        stem = self.stem()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._locked(stem):
                self._fill(stem, index, out, threads)
        except OSError as err:  # read-only dataset folder, disk full: train anyway, uncached
            log.info("not caching decoded images of %s in %s (%s); every run decodes them",
                     self.name, self.folder, " ".join(str(err).split()))
            read_into(out, range(len(index)), [self.paths[i] for i in index], self.channels, self.size, threads)
        return out

    @contextmanager
    def _locked(self, stem: str) -> Iterator[None]:
        try:
            import fcntl  # POSIX only; elsewhere parallel jobs may decode the same images twice
        except ImportError:
            yield
            return
        with open(self.folder / f"{stem}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _fill(self, stem: str, index: np.ndarray, out: torch.Tensor, threads: int | None) -> None:
        pixels_path, crc_path = self.folder / f"{stem}.npy", self.folder / f"{stem}.crc.npy"
        shape = (len(self.paths), self.channels, *self.size)
        pixels, fresh = self._open_pixels(pixels_path, shape)
        crcs = np.full(len(self.paths), -1, dtype=np.int64) if fresh else self._open_crcs(crc_path, len(self.paths))
        out_np = out.numpy()
        stored = np.flatnonzero(crcs[index] >= 0)
        bad = []
        for start in range(0, len(stored), _CHUNK):
            rows = stored[start : start + _CHUNK]
            out_np[rows] = pixels[index[rows]]
            bad += [k for k in rows.tolist() if zlib.crc32(out_np[k]) != crcs[index[k]]]
        if bad:
            log.warning("%d cached images in %s do not match their checksums (a corrupted cache); "
                        "decoding them again", len(bad), pixels_path)
        todo = np.sort(np.concatenate([np.flatnonzero(crcs[index] < 0), np.asarray(bad, dtype=np.int64)]))
        if not len(todo):
            return
        if len(todo) > 1000:
            log.info("decoding %d images of %s once; later runs read them from %s", len(todo), self.name, pixels_path)
        read_into(out, todo.tolist(), [self.paths[i] for i in index[todo]], self.channels, self.size, threads)
        for start in range(0, len(todo), _CHUNK):
            rows = todo[start : start + _CHUNK]
            pixels[index[rows]] = out_np[rows]
        pixels.flush()  # pixels reach the file before the checksums that vouch for them
        crcs[index[todo]] = [zlib.crc32(out_np[k]) for k in todo.tolist()]
        tmp = crc_path.with_name(f".{crc_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, crcs)
            os.replace(tmp, crc_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _open_pixels(self, path: Path, shape: tuple[int, ...]) -> tuple[np.memmap, bool]:
        """The pixel file as a writable memmap, and whether it was (re)created empty."""
        reason = None
        if path.exists():
            try:
                np.load(path, mmap_mode="r")  # "r" first: "r+" would silently extend a truncated file
                pixels = np.load(path, mmap_mode="r+")
                if pixels.shape == shape and pixels.dtype == np.uint8:
                    return pixels, False
                reason = f"it holds {pixels.dtype} {pixels.shape}, expected uint8 {shape}"
            except (ValueError, EOFError) as err:  # bad header, truncated file
                reason = " ".join(str(err).split())
            log.warning("image cache %s is unusable (%s); rebuilding it", path, reason)
            path.unlink()
        else:
            self._remove_stale(path.name[: -len(".npy")])
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape), True

    def _remove_stale(self, stem: str) -> None:
        """Caches of the same pool, size and channels under another hash were made for files that
        have changed since: each can be 1.4 GB, so they go when the new one is made."""
        prefix = stem.rsplit("-", 1)[0] + "-"
        for old in self.folder.glob(f"{prefix}*"):
            if not old.name.startswith(stem) and old.name[len(prefix):].split(".")[0].isalnum():
                log.info("removing the stale image cache %s (its files have changed)", old)
                old.unlink(missing_ok=True)

    @staticmethod
    def _open_crcs(path: Path, n: int) -> np.ndarray:
        try:
            crcs = np.load(path)
            if crcs.shape == (n,) and crcs.dtype == np.int64:
                return np.array(crcs)
            reason = f"it holds {crcs.dtype} {crcs.shape}, expected int64 ({n},)"
        except FileNotFoundError:
            return np.full(n, -1, dtype=np.int64)
        except (ValueError, EOFError) as err:  # a bad header, a truncated or pickled file
            reason = " ".join(str(err).split(". ")[0].split())
        log.warning("image cache checksums %s are unusable (%s); decoding every image again", path, reason)
        return np.full(n, -1, dtype=np.int64)
