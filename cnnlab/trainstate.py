"""TrainState: what fit()'s phases share, the built run (set up once) and the counters the epochs advance."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab import distributed, doctor
from cnnlab.build import Prepared
from cnnlab.config import RunConfig
from cnnlab.data import DatasetSpec, Split
from cnnlab.data.batches import Batches, RunData, StreamingBatches
from cnnlab.distributed import World
from cnnlab.engine import EpochState, StepContext
from cnnlab.interrupt import GracefulStop
from cnnlab.models.card import ModelCard
from cnnlab.record import RunRecord
from cnnlab.search.trial import EpochJudge
from cnnlab.trackers import Trackers


@dataclass
class TrainState:
    """What the phases share: the built run (set up once) and the counters the epochs advance."""

    run: RunConfig
    run_dir: Path
    record: RunRecord
    trackers: Trackers
    stop: GracefulStop
    world: World
    prep: Prepared  # device, pipeline, the model (its weights are what evaluation and checkpoints use)
    card: ModelCard
    spec: DatasetSpec  # with the class names the dataset's files hold
    data: RunData
    ctx: StepContext
    batches: Batches | StreamingBatches
    step_model: torch.nn.Module  # the module training steps run: compiled and/or DDP-wrapped `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # the data order and augmentation draws
    probe: Split  # the doctor's fixed batch: the same on every rank
    doctor: doctor.Settings
    done: int = 0  # epochs finished
    best_acc: float = -1.0  # best validation accuracy (without validation: the epoch number)
    best_loss: float = math.inf  # its validation loss: of two epochs with one accuracy, the lower loss is best
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights when best.pt is not kept
    train_seconds: float = 0.0
    partial: EpochState | None = None  # an epoch an interrupt stopped, to continue
    judge: EpochJudge | None = None  # a search's pruner, asked after every epoch whether to go on

    @property
    def model(self) -> torch.nn.Module:
        return self.prep.model

    @property
    def device(self) -> torch.device:
        return self.prep.device

    def stopping(self) -> bool:
        """A signal asked to stop; under torchrun every rank must stop at the same step, so one rank's counts."""
        return distributed.any_rank(self.stop.requested()) if self.world.distributed else self.stop.requested()
