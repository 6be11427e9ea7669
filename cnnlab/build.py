"""Building a run from its validated config: device, seeds, determinism, dataset spec, pipeline,
model, loss and the StepContext. Training (fit.py) and inference (inference.py) both build
here, so a checkpoint opens into exactly the model and pipeline that trained it.

This is the layer that reads the run config; the rooms below it (engine, doctor, data, models)
get the values built here, not the config.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from cnnlab import viz
from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig, TrainerConfig
from cnnlab.data import DatasetSpec, Pipeline, build_pipeline, spec_for
from cnnlab.distributed import World
from cnnlab.doctor import Settings
from cnnlab.engine import StepContext
from cnnlab.losses import LossConfig, build_loss, chance_loss
from cnnlab.memory import Footprint, check_fits, footprint
from cnnlab.models import build_model
from cnnlab.models.card import ModelCard, human, model_card

log = logging.getLogger("cnnlab")


def select_device(name: str) -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    elif (name == "cuda" and not cuda) or (name == "mps" and not mps):
        found = ", ".join(["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else []))
        raise ConfigError(f"trainer.device={name} but torch sees no {name} device here; available: {found} (or auto)")
    # cuda:<index>, not bare cuda, so summary.json says which GPU a job of a parallel sweep had
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_determinism(deterministic: bool) -> None:
    """trainer.deterministic: bitwise-repeatable runs; on CUDA at some cost in speed."""
    torch.backends.cudnn.benchmark = not deterministic  # autotuned conv kernels may differ run to run
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.backends.cudnn.deterministic = True
        # warn_only: CUDA bincount (confusion counts) has no deterministic kernel, yet integer counts
        # are exact whatever the order; everything that has one uses it
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Prepared:
    """Everything decided from the config alone, before any data is loaded."""

    device: torch.device
    spec: DatasetSpec
    pipeline: Pipeline
    model: torch.nn.Module  # on the CPU, with its seeded initial weights
    viz_layer: str | None  # the conv layer whose feature maps are drawn, if asked for


def prepare(run: RunConfig, spec: DatasetSpec | None = None, training: bool = True) -> Prepared:
    """Config-time checks that need the dataset's shape: pipeline and model build, device, and (for
    training) whether a training step fits in the device's memory.

    spec: the dataset's shape and classes when known already (a checkpoint records them, so a
    trained model opens without its image folder); by default read from the dataset config."""
    device = select_device(run.trainer.device)
    spec = spec or spec_for(run.dataset)
    pipeline = build_pipeline(run.augmentation, spec)
    channels, height, width = pipeline.output_shape
    if training:
        _check_memory(run, (channels, height, width), spec.num_classes, device)
    seed_everything(run.trainer.seed)  # the model's initial weights depend on the seed alone
    model = build_model(run.model, channels, spec.num_classes, (height, width))
    viz_layer = viz.resolve_layer(model, run.viz.layer) if run.viz.feature_maps else None
    return Prepared(device, spec, pipeline, model, viz_layer)


def _check_memory(run: RunConfig, shape: tuple[int, int, int], num_classes: int, device: torch.device) -> None:
    """Refuse, with the numbers, a run whose training step cannot fit: estimated on the meta device,
    before one byte of the model is allocated."""
    found, need = training_step_bytes(run, shape, num_classes)
    check_fits(f"training {run.model.label()} ({found.params:,} parameters) on {'x'.join(map(str, shape))} images "
               f"at trainer.batch_size={run.trainer.batch_size}", need, device,
               "lower the model's sizes, the image size (the augmentation's resize) or trainer.batch_size")


def training_step_bytes(run: RunConfig, shape: tuple[int, int, int] | None = None,
                        num_classes: int | None = None) -> tuple[Footprint, float]:
    """The model's footprint and the bytes one training step takes (weights, gradients, optimizer state,
    the activations kept at trainer.batch_size); the input shape and classes from the dataset config by default."""
    if shape is None or num_classes is None:
        spec = spec_for(run.dataset)
        shape, num_classes = build_pipeline(run.augmentation, spec).output_shape, spec.num_classes
    found = footprint(lambda: build_model(run.model, shape[0], num_classes, shape[1:]), (run.trainer.batch_size, *shape))
    slots = 2 if run.optimizer.name in ("adam", "adamw", "radam") else 1  # per-weight optimizer state
    return found, found.training_bytes(slots)


def uses_bf16(trainer: TrainerConfig, device: torch.device) -> bool:
    """trainer.precision=bf16 takes effect on CUDA only (CPU autocast would be slower, MPS lacks it)."""
    return trainer.precision == "bf16" and device.type == "cuda"


def step_context(trainer: TrainerConfig, loss: LossConfig, pipeline: Pipeline, num_classes: int,
                 device: torch.device, generator: torch.Generator | None = None) -> StepContext:
    """The one StepContext factory: training passes its data generator, inference none (eval draws nothing)."""
    return StepContext(pipeline=pipeline, loss_fn=build_loss(loss, num_classes), device=device,
                       bf16=uses_bf16(trainer, device), channels_last=trainer.channels_last, generator=generator)


def doctor_settings(run: RunConfig, num_classes: int) -> Settings:
    """What the doctor needs to know of this run: the chance-level loss and the settings it advises on."""
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    return Settings(
        num_classes=num_classes,
        chance_loss=chance_loss(run.loss, num_classes),
        model=model.name,
        batch_norm=getattr(model, "batch_norm", None),
        init=getattr(model, "init", None),
        activation=getattr(model, "activation", None),
        optimizer=optimizer.name,
        lr=optimizer.lr,
        momentum=getattr(optimizer, "momentum", None),
        scheduler=scheduler.name,
        warmup=scheduler.warmup_epochs,
        epochs=run.trainer.epochs,
        grad_clip=run.trainer.grad_clip,
    )


def model_card_logged(run: RunConfig, prep: Prepared) -> ModelCard:
    """The model card, with its headline numbers on the console."""
    card = model_card(prep.model, run.model.label(), prep.pipeline.output_shape, prep.spec.num_classes,
                      run.model.is_standard_form())
    log.info("model %s: %s parameters (%.2f MB), %s MACs per image, input %s, device %s",
             run.model.label(), f"{card.params_total:,}", card.model_size_mb, human(card.macs_per_image),
             "x".join(map(str, card.input_shape)), prep.device)
    if card.reference_line:
        log.info("reference: %s", card.reference_line)
    return card


def step_model(model: torch.nn.Module, compile: bool, mode: str, world: World) -> torch.nn.Module:
    """The module training steps run. It shares its weights with `model`, which evaluation, the doctor
    and checkpoints use. Training batches all have one shape (drop_last) and the compiled module only
    ever runs in train mode, so nothing recompiles."""
    wrapped = model
    if world.distributed:
        device = next(model.parameters()).device
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped, mode=mode) if compile else wrapped
