"""Sweeps through Hydra's launcher plugins: a clear message when a plugin is missing, and the
share of the machine each job takes when jobs run side by side (CPU threads, one GPU each)."""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnlab.checks import importable
from cnnlab.config import config_dir

log = logging.getLogger("cnnlab")

# The plugins' own launcher names (from their ConfigStore entries) and the package each needs.
PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def _plugin_for(launcher: str) -> tuple[str, str] | None:
    """(module, pip name) a launcher config needs; our own configs in conf/hydra/launcher/ name
    the plugin config they extend in their defaults list."""
    if launcher in PLUGINS:
        return PLUGINS[launcher]
    path = Path(config_dir()) / "hydra" / "launcher" / f"{launcher}.yaml"
    if path.is_file():
        for entry in OmegaConf.load(path).get("defaults", []):
            if isinstance(entry, str) and entry in PLUGINS:
                return PLUGINS[entry]
    return None  # the basic launcher, or a name Hydra itself will reject with the valid choices


def missing_launcher_message(argv: list[str]) -> str | None:
    """The message for a `hydra/launcher=NAME` override whose plugin is not installed, else None.

    Without the plugin Hydra only says the config `hydra/launcher/NAME` was not found, which
    does not tell the user that an optional extra is missing.
    """
    for arg in argv:
        key, sep, name = arg.lstrip("+").partition("=")
        if not sep or key != "hydra/launcher":
            continue
        plugin = _plugin_for(name)
        if plugin and not importable(plugin[0]):
            return (f"hydra/launcher={name} needs Hydra's launcher plugin {plugin[1]}, which is not installed. "
                    f"Install the launcher plugins with `pip install 'cnnlab[launchers]'` (or `pip install "
                    f"{plugin[1]}`), or drop the hydra/launcher override to run the sweep's jobs one after another.")
    return None


@contextmanager
def gpu_lease(lock_dir: Path, num_gpus: int, fallback: int = 0) -> Iterator[int]:
    """The index of a GPU no other job of the sweep holds, for as long as the job runs.

    A lease is a non-blocking flock on lock_dir/.gpu<i>.<host>.lock (GPU indices are per host, and a
    sweep dir may be shared by several nodes). Closing the file releases it, so a worker process
    that joblib reuses for the next job, or one that dies, never keeps a GPU. With every GPU
    taken (more jobs than GPUs), the job shares GPU `fallback % num_gpus` instead of waiting.
    """
    import fcntl  # POSIX only: imported here so that the CLI still loads on Windows

    lock_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for index in range(num_gpus):
        handle = open(lock_dir / f".gpu{index}.{host}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        with handle:
            yield index
        return
    log.warning("all %d GPUs are leased by other jobs of this sweep; sharing cuda:%d", num_gpus, fallback % num_gpus)
    yield fallback % num_gpus


def thread_share(launcher: DictConfig) -> tuple[int, int] | None:
    """(jobs at once, torch threads per job) when the launcher runs jobs side by side, else None.

    Each of N jobs taking every core oversubscribes the CPU and makes a parallel sweep slower
    than a sequential one, so each job gets an even share of the cores instead.
    """
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    import joblib  # installed with the joblib launcher plugin, the only way to get here

    # joblib's own reading of n_jobs (-1 = all CPUs, -2 = all but one) and of the CPU count
    # (affinity and cgroup quotas), so the share matches the number of workers it starts
    jobs = joblib.effective_n_jobs(int(launcher.get("n_jobs", -1)))
    return (jobs, max(1, joblib.cpu_count() // jobs)) if jobs > 1 else None


@contextmanager
def job_placement(cfg: DictConfig) -> Iterator[None]:
    """Around one job of a multirun: its share of CPU threads and, on a multi-GPU host, its own GPU."""
    hydra_cfg = HydraConfig.get()
    with ExitStack() as stack:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            share = thread_share(hydra_cfg.launcher)
            if share and cfg.trainer.num_threads is None:
                jobs, threads = share
                torch.set_num_threads(threads)  # fit() leaves torch's threads alone when num_threads is null
                log.info("%d jobs run at once: torch uses %d CPU thread(s) in this job (pid %d); "
                         "trainer.num_threads=N sets it yourself", jobs, threads, os.getpid())
            gpus = torch.cuda.device_count()
            if gpus > 1 and cfg.trainer.device in ("auto", "cuda"):
                index = stack.enter_context(gpu_lease(Path(hydra_cfg.sweep.dir), gpus, fallback=hydra_cfg.job.num))
                torch.cuda.set_device(index)  # torch.device("cuda") in the rest of the code now means this GPU
                log.info("job %s runs on cuda:%d of %d GPUs", hydra_cfg.job.num, index, gpus)
        yield
