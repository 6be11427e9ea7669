"""fit / train_one_epoch / evaluate, on data resident on the training device.

Each split is moved to the device once as a uint8 tensor. An epoch is a randperm over it;
augmentation runs per sample but in whole batches on the device; loss and accuracy accumulate
in device tensors and are read back once per epoch. No PIL, no DataLoader workers, no
per-sample Python in the hot loop.
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import cnnlab
from cnnlab import report, viz
from cnnlab.checkpoint import atomic_write_text, load_checkpoint, rng_state, save_checkpoint
from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig
from cnnlab.data import DatasetSpec, Split, load_dataset, spec_for
from cnnlab.data.augment import Pipeline, build_pipeline
from cnnlab.losses import LossFn, build_loss
from cnnlab.models import build_model
from cnnlab.models.card import human, model_card
from cnnlab.optim import build_optimizer, build_scheduler

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


@dataclass
class Batches:
    """Mini-batches of a device-resident split; a fresh randperm each epoch when shuffling."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool = False
    # Training drops the ragged last batch (a batch of 1 breaks BatchNorm, and fixed shapes
    # keep compiled graphs stable) unless the split is smaller than one batch.
    drop_last: bool = False
    generator: torch.Generator | None = None

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=self.labels.device, generator=self.generator)
        for i in range(len(self)):
            if self.shuffle:
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                yield self.images[idx], self.labels[idx]
            else:
                s = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self.images[s], self.labels[s]


@dataclass
class StepContext:
    """What train and eval steps share: the input pipeline, loss, precision and layout."""

    pipeline: Pipeline
    loss_fn: LossFn
    device: torch.device
    bf16: bool
    channels_last: bool
    generator: torch.Generator | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = self.pipeline(images, train=train, generator=self.generator)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_one_epoch(
    model: torch.nn.Module,
    batches: Batches,
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: tqdm | None = None,
) -> tuple[float, float, int]:
    """One pass over the training split; returns (mean loss, accuracy, images seen)."""
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    seen = 0
    for images, labels in batches:
        x = ctx.inputs(images, train=True)
        with ctx.autocast():
            logits = model(x)
            loss = ctx.loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if progress is not None:
            progress.update(1)
    return loss_sum.item() / seen, correct.item() / seen, seen  # the epoch's one host sync


@dataclass
class Evaluation:
    loss: float
    acc: float
    confusion: np.ndarray  # [true, predicted] counts


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, ctx: StepContext, batch_size: int, num_classes: int) -> Evaluation:
    model.eval()
    k = num_classes
    loss_sum = torch.zeros((), device=ctx.device)
    counts = torch.zeros(k * k, dtype=torch.long, device=ctx.device)
    for images, labels in Batches(split.images, split.labels, batch_size):
        with ctx.autocast():
            logits = model(ctx.inputs(images, train=False))
        loss_sum += ctx.loss_fn(logits, labels) * len(labels)
        counts += torch.bincount(labels * k + logits.argmax(1), minlength=k * k)
    confusion = counts.view(k, k).cpu().numpy()
    n = max(len(split), 1)
    return Evaluation(loss_sum.item() / n, float(np.trace(confusion)) / n, confusion)


@dataclass
class Prepared:
    """Everything decided from the config alone, before any data is loaded."""

    device: torch.device
    spec: DatasetSpec
    pipeline: Pipeline
    model: torch.nn.Module
    viz_layer: str | None  # the conv layer whose feature maps are drawn, if asked for


def prepare(run: RunConfig) -> Prepared:
    """Config-time checks that need the dataset's shape: pipeline and model build, device."""
    device = select_device(run.trainer.device)
    spec = spec_for(run.dataset)
    pipeline = build_pipeline(run.augmentation, spec)
    channels, height, width = pipeline.output_shape
    seed_everything(run.trainer.seed)  # the model's initial weights depend on the seed alone
    model = build_model(run.model, channels, spec.num_classes, (height, width))
    viz_layer = viz.resolve_layer(model, run.viz.layer) if run.viz.feature_maps else None
    return Prepared(device, spec, pipeline, model, viz_layer)


def _split_to(split: Split | None, device: torch.device) -> Split | None:
    return None if split is None else Split(split.images.to(device), split.labels.to(device))


def fit(run: RunConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one run and write every file of the run-directory contract; returns the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "status": "running",
        "model": run.model.name,
        "dataset": run.dataset.name,
        "overrides": list(overrides or []),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "cnnlab_version": cnnlab.__version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
    }
    try:
        return _fit(run, run_dir, summary)
    except KeyboardInterrupt:
        summary.update(status="interrupted")
        raise
    except BaseException as err:
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        report.write_summary(run_dir, summary)


def _fit(run: RunConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    t = run.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    prep = prepare(run)
    device, spec, model = prep.device, prep.spec, prep.model
    card = model_card(model, run.model.name, prep.pipeline.output_shape, spec.num_classes)
    atomic_write_text(run_dir / "model_summary.txt", card.text())
    summary.update(device=str(device), num_classes=spec.num_classes, seed=t.seed, **card.summary_fields())
    log.info("model %s: %s parameters (%.2f MB), %s MACs per image, input %s, device %s",
             run.model.name, f"{card.params_total:,}", card.model_size_mb, human(card.macs_per_image),
             "x".join(map(str, card.input_shape)), device)
    if card.reference_line:
        log.info("reference: %s", card.reference_line)

    data = load_dataset(run.dataset, seed=t.seed)
    train, val, test = (_split_to(s, device) for s in (data.train, data.val, data.test))
    summary.update(train_size=len(train), val_size=len(val) if val else 0, test_size=len(test))
    log.info("data %s: %d train / %d val / %d test images, %d classes",
             spec.name, len(train), summary["val_size"], len(test), spec.num_classes)

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    ctx = StepContext(
        pipeline=prep.pipeline,
        loss_fn=build_loss(run.loss, spec.num_classes),
        device=device,
        bf16=t.precision == "bf16" and device.type == "cuda",
        channels_last=t.channels_last,
        generator=generator,
    )
    if t.precision == "bf16" and not ctx.bf16:
        log.warning("trainer.precision=bf16 applies on CUDA only; training in fp32 on %s", device)
    summary["precision"] = "bf16" if ctx.bf16 else "fp32"
    batches = Batches(train.images, train.labels, t.batch_size, shuffle=True, drop_last=True, generator=generator)
    optimizer = build_optimizer(run.optimizer, model.parameters())
    scheduler = build_scheduler(run.scheduler, optimizer, len(batches), t.epochs)

    ckpt_dir = run_dir / "checkpoints"
    best_acc, best_epoch, train_seconds, step = -1.0, 0, 0.0, 0
    show_progress = t.progress and sys.stderr.isatty()
    for epoch in range(1, t.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        tic = time.perf_counter()
        with tqdm(total=len(batches), desc=f"epoch {epoch}/{t.epochs}", leave=False, delay=2,
                  disable=not show_progress, file=sys.stderr) as bar:
            train_loss, train_acc, seen = train_one_epoch(model, batches, ctx, optimizer, scheduler, bar)
        train_time = time.perf_counter() - tic
        train_seconds += train_time
        step += len(batches)
        val_result = evaluate(model, val, ctx, t.eval_batch_size, spec.num_classes) if val else None
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_result.loss if val_result else "",
            "val_acc": val_result.acc if val_result else "",
            "lr": lr,
            "epoch_seconds": round(time.perf_counter() - tic, 4),
            "images_per_second": round(seen / train_time, 1),
        }
        report.append_metrics(run_dir, row)
        summary.update(epochs_completed=epoch, train_seconds=round(train_seconds, 3),
                       final_train_loss=train_loss, final_train_acc=train_acc)
        if val_result:
            summary.update(final_val_loss=val_result.loss, final_val_acc=val_result.acc)
        val_text = f"val loss {val_result.loss:.4f} acc {val_result.acc:.2%}  " if val_result else ""
        log.info("epoch %d/%d  train loss %.4f acc %.2f%%  %slr %.3g  %.1fs  %.0f img/s",
                 epoch, t.epochs, train_loss, 100 * train_acc, val_text, lr, row["epoch_seconds"], seen / train_time)

        if not math.isfinite(train_loss):
            summary.update(status="diverged", diverged_epoch=epoch)
            log.error("training diverged in epoch %d: the loss is %s. Try a lower optimizer.lr, "
                      "a warm-up (scheduler.warmup_epochs=1) or model.batch_norm=true.", epoch, train_loss)
            break

        state = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            epoch=epoch, step=step, rng=rng_state(generator), config=run.to_dict(),
            val_acc=val_result.acc if val_result else None,
        )
        save_checkpoint(ckpt_dir / "last.pt", **state)
        # Without a validation split the last epoch stands in for the best one.
        score = val_result.acc if val_result else float(epoch)
        if score > best_acc:
            best_acc, best_epoch = score, epoch
            save_checkpoint(ckpt_dir / "best.pt", **state)

    summary.update(best_epoch=best_epoch or None, best_val_acc=best_acc if (val and best_epoch) else None)
    if best_epoch:
        # The test set is scored once, with the weights that were best on validation.
        model.load_state_dict(load_checkpoint(ckpt_dir / "best.pt", map_location=device)["model"])
        result = evaluate(model, test, ctx, t.eval_batch_size, spec.num_classes)
        summary.update(test_loss=result.loss, test_acc=result.acc, test_checkpoint="best" if val else "last")
        report.write_confusion(run_dir, result.confusion, spec.classes)
        log.info("test (epoch %d weights): loss %.4f  accuracy %.2f%%", best_epoch, result.loss, 100 * result.acc)
        if prep.viz_layer:
            summary["feature_maps"] = _draw_feature_maps(run, run_dir, model, test, ctx, prep.viz_layer, spec)
    report.plot_curves(run_dir, title=f"{run.model.name} on {spec.name}")
    if summary["status"] == "running":
        summary["status"] = "completed"
    summary["config"] = run.to_dict()
    return summary


def _draw_feature_maps(run: RunConfig, run_dir: Path, model: torch.nn.Module, test: Split, ctx: StepContext,
                       layer: str, spec: DatasetSpec) -> dict[str, Any]:
    """feature_maps.png for the first viz.num_images test images; returns what summary.json records."""
    images, labels = test.images[: run.viz.num_images], test.labels[: run.viz.num_images]
    with ctx.autocast():
        activations, predicted = viz.capture(model, layer, ctx.inputs(images, train=False))
    panels = viz.plot_feature_maps(
        run_dir / "feature_maps.png", images, activations, predicted.tolist(), labels.tolist(), spec.classes,
        run.viz.channels, title=f"{run.model.name}: feature maps at {layer} "
        f"({activations.shape[1]} channels, {activations.shape[2]}x{activations.shape[3]})",
    )
    return {"file": "feature_maps.png", "layer": layer, "panels": panels,
            "channels_shown": min(run.viz.channels, activations.shape[1]),
            "predicted": predicted.tolist(), "true": labels.tolist()}
