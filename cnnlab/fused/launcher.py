"""hydra/launcher=fused: a sweep's jobs in groups that train as one (hydra_plugins/cnnlab_fused holds the
Hydra class). Jobs that fuse with no other run as Hydra's basic launcher runs them; a group's jobs run
through Hydra's run_job twice each (session.py), so every member gets its directory, config files,
train.log and outcome exactly as a lone job does. Groups run one after another on one device.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.build import select_device, training_step_bytes
from cnnlab.config import validate
from cnnlab.fused.grouping import plan_groups
from cnnlab.fused.session import Session, active
from cnnlab.fused.settings import FusedSettings
from cnnlab.interrupt import GracefulStop
from cnnlab.memory import available_bytes, gigabytes

log = logging.getLogger("cnnlab")


def launch(settings: FusedSettings, context: HydraContext, task: TaskFunction, config: DictConfig,
           job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
    """Every job of the batch, fused where they can be; stops after a job a signal stopped."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = []
    for index, overrides in enumerate(job_overrides):
        job = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.id = job.hydra.job.num = first + index
        configs.append(job)
    tasks = [OmegaConf.to_container(c, resolve=False) for c in configs]
    groups = [part for group in plan_groups([{k: v for k, v in t.items() if k != "hydra"} for t in tasks],
                                            settings.max_members)
              for part in _by_memory(group, configs, settings)]
    returns: dict[int, JobReturn] = {}
    for number, (group, reserved) in enumerate(groups):
        jobs = [first + i for i in group]
        log.info("fused launcher: group %d of %d: job%s %s", number + 1, len(groups), "s" * (len(jobs) > 1),
                 ", ".join(f"#{j} {' '.join(filter_overrides(job_overrides[j - first]))}" for j in jobs))
        if len(group) == 1:
            returns[group[0]] = _run(context, task, configs[group[0]])
        else:
            returns.update(_fused(settings, context, task, configs, group, reserved))
    return [returns[i] for i in sorted(returns)]


def _fused(settings: FusedSettings, context: HydraContext, task: TaskFunction, configs: list[DictConfig],
           group: list[int], reserved: float) -> dict[int, JobReturn]:
    """A group's jobs: each opened through run_job, then all trained on the first one's second run_job.
    reserved: the bytes the group's training steps take, by estimate, which its members' data leave free."""
    returns: dict[int, JobReturn] = {}
    with GracefulStop() as stop:  # one for the group: a signal checkpoints every member
        session = Session(settings, stop, reserved)
        with active(session):
            for index in group:
                if stop.requested() and session.members:  # a signal: those not yet opened run on the next command
                    break
                returns[index] = _run(context, task, configs[index])
            session.training = True
            for index in group:  # a stop leaves through the task function (SystemExit, KeyboardInterrupt)
                if int(configs[index].hydra.job.num) in session.members:
                    returns[index] = _run(context, task, configs[index])
    return returns


def _run(context: HydraContext, task: TaskFunction, config: DictConfig) -> JobReturn:
    ret = run_job(hydra_context=context, task_function=task, config=config, job_dir_key="hydra.sweep.dir",
                  job_subdir_key="hydra.sweep.subdir")
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return ret


def _by_memory(group: list[int], configs: list[DictConfig], settings: FusedSettings) -> list[tuple[list[int], float]]:
    """The group split so that each part's training steps fit memory_fraction of the device's free memory;
    with each part the bytes its steps take, by estimate (0 where not known)."""
    if len(group) == 1:
        return [(group, 0.0)]
    try:
        job = configs[group[0]]
        run = validate(OmegaConf.create({k: job[k] for k in job if k != "hydra"}))  # its own keys, not Hydra's
        found, need = training_step_bytes(run)
        device = select_device(run.trainer.device)
        if settings.cuda_graphs and device.type == "cuda":  # a captured step keeps its activations in the graph's
            need += found.activation_bytes()  # pool while an eager step (an epoch's last batch) takes its own
        free = available_bytes(device) * settings.memory_fraction
    except Exception:  # noqa: BLE001 - a config that does not build: the jobs themselves report what is wrong
        return [(group, 0.0)]
    fits = max(1, math.floor(free / need)) if need > 0 and math.isfinite(free) else len(group)
    if fits < len(group):
        log.info("fused launcher: a member's training step takes about %s and %s may be used, so groups of at most %d",
                 gigabytes(need), gigabytes(free), fits)
    return [(group[i:i + fits], need * len(group[i:i + fits])) for i in range(0, len(group), fits)]
