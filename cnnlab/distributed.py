"""One run on N processes: `torchrun --nproc_per_node=N -m cnnlab ...` (DistributedDataParallel).

trainer.batch_size stays the global batch: each rank takes its 1/N slice of every batch, so a
run on N GPUs follows the same optimisation as one process with the same batch size (up to
BatchNorm, whose statistics are per rank). Metrics are summed over ranks; only rank 0 writes.

Outside torchrun every function here is a no-op on a world of one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnnlab.checks import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """What torchrun told this process (RANK, WORLD_SIZE, LOCAL_RANK); a world of one otherwise."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def rank_argv(argv: list[str], world: World) -> list[str]:
    """Command-line changes for ranks other than 0: Hydra makes no run dir of its own and logs
    to the console only, since rank 0's run dir (broadcast later) gets every file."""
    if world.is_main:
        return argv
    if "-m" in argv or "--multirun" in argv:
        return argv  # refused with a clear message once the config is known (see setup)
    keep = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging="))]
    return keep + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


_control: dist.ProcessGroup | None = None  # gloo group for small CPU flags, whatever the main backend


def setup(world: World, device_name: str, multirun: bool) -> None:
    """Join the process group (NCCL for CUDA, gloo on CPU) and pin this rank's GPU."""
    global _control
    if not world.distributed or dist.is_initialized():
        return
    if multirun:
        raise ConfigError("torchrun with -m: a distributed run trains one config; run the sweep's jobs one by one "
                          "under torchrun, or sweep without torchrun")
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise ConfigError(f"torchrun started {world.local_rank + 1}+ processes on this node but torch sees "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node={torch.cuda.device_count()}")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    _control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD


def teardown() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast(value: object) -> object:
    """Rank 0's value on every rank (a path, a decision)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum device tensors over ranks, in place (epoch totals, confusion counts)."""
    if active():
        for tensor in tensors:
            dist.all_reduce(tensor)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one: a stop signal every rank must obey at the same step."""
    if not active():
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control)
    return bool(box.item())


def all_min(tensor: torch.Tensor) -> None:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)


def barrier() -> None:
    """Wait for every rank: e.g. for rank 0's checkpoint before the others read it."""
    if active():
        dist.barrier(group=_control)


def command_prefix(world: World) -> str:
    """How to start a run like this one again (the resume hint): torchrun for a distributed run."""
    return f"torchrun --nproc_per_node={world.size} -m cnnlab" if world.distributed else "python -m cnnlab"
