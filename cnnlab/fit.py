"""fit(): one run, start to finish, as four phases over one TrainState.

    setup    build the model, data, step context, optimizer and schedule (build.py, data/batches.py)
    resume   with trainer.resume: weights, optimizer, schedule position, RNGs, a partial epoch
    epochs   train (engine.py), validate, log, examine (doctor.py), checkpoint; stop on divergence, a
             stuck run (trainer.stop_when_stuck), a search's pruner or a signal (checkpointed at a step)
    finish   score the best weights on the test set; confusion matrix, feature maps, curves

Every file of the run directory is written here or by what is called from here; summary.json
only through the RunRecord (record.py). Under torchrun every rank trains and only rank 0 writes.
The fused launcher drives the same phases for each member of a group (opened_run, begin_epoch,
close_epoch, end_epoch, finish), with the group's steps in between (fused/group.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cnnlab import distributed, doctor, notebook, report, viz
from cnnlab.build import (
    Prepared, configure_determinism, doctor_settings, model_card_logged, prepare, step_context, step_model,
)
from cnnlab.checkpoint import atomic_write_text, load_checkpoint, remove_partial_writes, rng_state, save_checkpoint
from cnnlab.checks import ConfigError
from cnnlab.config import RunConfig
from cnnlab.data import load_dataset
from cnnlab.data.batches import head, place_data
from cnnlab.distributed import World, world_from_env
from cnnlab.engine import EpochState, Evaluation, evaluate, run_steps, settled
from cnnlab.interrupt import GracefulStop, Interrupted
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.record import RunRecord, Summary, claim
from cnnlab.report.drawing import Drawing
from cnnlab.resume import check_epochs, restore, resume_point, trim_metrics
from cnnlab.search.trial import EpochJudge
from cnnlab.trackers import Trackers, open_trackers
from cnnlab.trainstate import TrainState

log = logging.getLogger("cnnlab")
PROGRESS_DELAY_S = 2.0  # an epoch shorter than this shows no bar at all: no flicker on quick runs


def fit(run: RunConfig, run_dir: Path, overrides: list[str] | None = None, record: RunRecord | None = None,
        judge: EpochJudge | None = None, stop: GracefulStop | None = None) -> Summary:
    """Train one run, or continue it with trainer.resume, writing every file of the run-directory contract.

    Returns the summary. `record`: the run's record when the caller made it (the CLI, to record
    failures before fit too); by default a new one, or the resumed run's. A resume that fails
    before training starts leaves the run's summary.json as it was; any other failure is recorded.
    `judge`: a search trial's pruner (search/trial.py), asked after each epoch; it may end the run. `stop`: the
    caller's active signal catcher (a sweep's job asks it afterwards), else fit's own."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    world = world_from_env()
    if record is None:
        opener = RunRecord.for_resume if run.trainer.resume else RunRecord.new
        record = opener(run_dir, overrides, writes=world.is_main)
    with claim(run_dir) if world.is_main else contextlib.nullcontext():  # one live process per run dir
        return _fit(run, run_dir, overrides, record, world, judge, stop)


def _fit(run: RunConfig, run_dir: Path, overrides: list[str], record: RunRecord, world: World,
         judge: EpochJudge | None, stop: GracefulStop | None) -> Summary:
    # signals are caught from the start, so one that comes during set-up also stops cleanly at the first step
    with contextlib.nullcontext(stop) if stop else GracefulStop() as stop, \
            opened_run(run, run_dir, overrides, record, world, judge, stop) as state:
        _epochs(state)
        finish(state)
    return record.summary


@contextlib.contextmanager
def opened_run(run: RunConfig, run_dir: Path, overrides: list[str], record: RunRecord, world: World,
               judge: EpochJudge | None, stop: GracefulStop, shared: dict[str, Any] | None = None) -> Iterator[TrainState]:
    """The run set up (and resumed) for its epochs, which the caller trains: fit(), or the fused launcher
    for each member of a group. A failure inside is recorded in summary.json; trackers close at the end.
    shared: what runs opened before loaded: the datasets read (by config) and placed (by config and seed),
    so a fused group reads its files once and places them once per seed; and under "reserved", the bytes
    the group's training steps will take on the device, which its data must leave free."""
    configure_determinism(run.trainer.deterministic)
    if run.trainer.num_threads:
        torch.set_num_threads(run.trainer.num_threads)
    prep = prepare(run)  # the config-time checks that need the dataset's shape, before the run begins
    if not run.trainer.resume:
        record.begin(run.model.label(), run.dataset.name, run.to_dict())
    trackers = Trackers()
    try:
        if world.is_main:  # under torchrun only rank 0 writes files
            trackers = open_trackers(run.logger, run.to_dict(), run_dir, record.summary, bool(run.trainer.resume))
        state = _setup(run, prep, run_dir, record, trackers, stop, world, {} if shared is None else shared)
        state.judge = judge
        if run.trainer.resume:
            _resume(state, overrides)
        _record_built(state)
        yield state
    except Interrupted:
        raise  # checkpointed and recorded where
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
        record.interrupted()
        raise
    except BaseException as err:
        record.failed(err)
        raise
    finally:
        trackers.close(record.summary if record.live else None, run_dir)


# ------------------------------------------------------------------------------- setup


def _setup(run: RunConfig, prep: Prepared, run_dir: Path, record: RunRecord, trackers: Trackers,
           stop: GracefulStop, world: World, shared: dict[str, Any]) -> TrainState:
    t = run.trainer
    card = model_card_logged(run, prep)
    if t.batch_size % world.size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is the global batch and must divide evenly over the "
                          f"{world.size} processes of this torchrun; use a multiple of {world.size}")
    key = repr((run.dataset, t.seed, prep.device))  # the seed draws the validation split
    placed = shared.setdefault("placed", {})
    if key not in placed:
        loaded = load_dataset(run.dataset, seed=t.seed, read=shared.setdefault("read", {}))
        placed[key] = loaded, place_data(loaded, run.dataset.loader, run.dataset.num_workers, prep.device, world,
                                         shared.get("reserved", 0.0))
    loaded, data = placed[key]
    spec, device = loaded.spec, prep.device  # spec: the class names the files name
    log.info("data %s: %d train / %d val / %d test images, %d classes, %s%s", spec.name, len(loaded.train),
             len(loaded.val) if loaded.val else 0, len(loaded.test), spec.num_classes, data.loader,
             f" ({data.workers} workers)" if data.loader == "streaming" else " on the device")
    if world.distributed:
        torch.manual_seed(t.seed + world.rank)  # weights are built alike on every rank; dropout differs per rank
    model = prep.model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    ctx = step_context(t, run.loss, prep.pipeline, spec.num_classes, device, generator)
    if t.precision == "bf16" and not ctx.bf16:
        log.warning("trainer.precision=bf16 applies on CUDA only; training in fp32 on %s", device)
    batches = data.training_batches(t.batch_size, device, generator, world)
    optimizer = build_optimizer(run.optimizer, model.parameters())
    return TrainState(
        run, run_dir, record, trackers, stop, world, prep, card, spec, data, ctx, batches,
        step_model=step_model(model, t.compile, t.compile_mode, world), optimizer=optimizer,
        scheduler=build_scheduler(run.scheduler, optimizer, len(batches), t.epochs), generator=generator,
        probe=head(data.train, t.batch_size, device),
        doctor=doctor_settings(run, spec.num_classes),
    )


def _record_built(s: TrainState) -> None:
    t = s.run.trainer
    if s.world.is_main:
        atomic_write_text(s.run_dir / "model_summary.txt", s.card.text())
    s.record.built(device=str(s.device), num_classes=s.spec.num_classes, seed=t.seed, **s.card.summary_fields(),
                   train_size=len(s.data.train), val_size=s.data.val_size, test_size=s.data.test_size,
                   precision="bf16" if s.ctx.bf16 else "fp32", loader=s.data.loader, world_size=s.world.size)


# ------------------------------------------------------------------------------- resume


def _resume(s: TrainState, overrides: list[str]) -> None:
    """Continue from the checkpoint: weights, optimizer, schedule position, RNGs, counters. A run
    stopped before its first checkpoint starts over in place; one stopped after its last epoch but
    before its test score is only finished."""
    t = s.run.trainer
    point = resume_point(t.resume)
    if s.world.is_main:  # this process holds the directory: a killed one's half-written files go
        for folder in (s.run_dir, s.run_dir / "checkpoints"):
            for path in remove_partial_writes(folder):
                log.info("removed %s, a file a killed process was writing", path)
    ckpt = {"epoch": 0, "step": 0}
    if point.checkpoint is not None:
        ckpt = restore(point.checkpoint, s.model, s.optimizer, s.scheduler, s.generator, s.run.model.label(),
                       t.epochs, s.device)
        s.best_acc, s.best_epoch = ckpt.get("best_val_acc", -1.0), ckpt.get("best_epoch", ckpt["epoch"])
        s.best_loss = ckpt.get("best_val_loss", math.inf)  # checkpoints before it was kept: any loss beats it
        s.train_seconds = ckpt.get("train_seconds", 0.0)
    s.done = ckpt["epoch"]
    if ckpt.get("partial") is None:
        check_epochs(t.epochs, s.done, point.checkpoint, s.record.summary.finished)
    s.partial = EpochState.from_state_dict(ckpt["partial"], s.device) if ckpt.get("partial") else None
    if s.partial and not s.world.is_main:
        s.partial.forget_sums()
    row = trim_metrics(s.run_dir, s.done) if s.world.is_main else None
    s.record.resumed(point.checkpoint, s.done, ckpt["step"], t.epochs, overrides, s.run.to_dict())
    s.record.restored(s.done, s.train_seconds, s.best_epoch, s.best_acc if s.data.val else None, row)
    what = "finishing it (test score, plots)" if s.done >= t.epochs and not s.partial else f"training to epoch {t.epochs}"
    log.info("resumed %s at epoch %d%s, step %d; %s", point.checkpoint or f"{s.run_dir} from the start", s.done,
             f" + {s.partial.step} batches" if s.partial else "", ckpt["step"], what)


def _save(s: TrainState, name: str, epoch: int, partial: EpochState | None = None,
          val_acc: float | None = None) -> None:
    """checkpoints/<name>: everything a resume needs to continue bitwise, and inference to open the model."""
    if not s.world.is_main or s.run.trainer.checkpoints == "none":
        return
    save_checkpoint(
        s.run_dir / "checkpoints" / name, model=s.model.state_dict(), optimizer=s.optimizer.state_dict(),
        # the schedule's position only: the schedule itself is rebuilt from the config on resume
        scheduler={k: v for k, v in s.scheduler.state_dict().items() if k != "lr_lambdas"},
        scaler=None,  # bf16 autocast needs no loss scaling; the slot keeps the format ready for fp16
        epoch=epoch, step=epoch * len(s.batches) + (partial.step if partial else 0), rng=rng_state(s.generator),
        config=s.run.to_dict(), val_acc=val_acc, best_val_acc=s.best_acc, best_val_loss=s.best_loss, best_epoch=s.best_epoch,
        train_seconds=round(s.train_seconds, 3), partial=partial.state_dict() if partial else None,
        spec=dataclasses.asdict(s.spec),  # input shape, class names, stats: inference needs no dataset files
    )


def _interrupted(s: TrainState, epoch: int, partial: EpochState | None) -> Interrupted:
    """Record where a signal stopped the run (checkpointed already) and how to continue it."""
    step = (epoch - 1) * len(s.batches) + (partial.step if partial else len(s.batches))
    s.record.interrupted(epoch, step, s.train_seconds,
                         f"{distributed.command_prefix(s.world)} trainer.resume={s.run_dir.resolve()}")
    return Interrupted(s.stop.signum or signal.SIGTERM)


# ------------------------------------------------------------------------------- epochs


def _epochs(s: TrainState) -> None:
    for epoch in range(s.done + 1, s.run.trainer.epochs + 1):
        state = _train_epoch(s, epoch)
        if not end_epoch(s, epoch, state):
            break


def _train_epoch(s: TrainState, epoch: int) -> EpochState:
    """One epoch of steps (or the rest of an interrupted one); a signal checkpoints mid-epoch and stops."""
    t = s.run.trainer
    state = begin_epoch(s)
    tic = time.perf_counter()
    show = t.progress and (sys.stderr.isatty() or notebook.in_notebook()) and s.world.is_main
    with notebook.progress_bar()(total=len(s.batches), initial=state.step, desc=f"epoch {epoch}/{t.epochs}", leave=False,
              delay=PROGRESS_DELAY_S, disable=not show, file=sys.stderr) as bar:
        run_steps(s.step_model, s.batches, s.ctx, s.optimizer, s.scheduler, state, bar, s.stopping, t.grad_clip)
    close_epoch(s, epoch, state, settled(s.device) - tic)
    return state


def begin_epoch(s: TrainState) -> EpochState:
    """The epoch's state: a new one, or the one an interrupt stopped, to continue."""
    state, s.partial = s.partial or EpochState.begin(s.batches, s.optimizer, s.device), None
    return state


def close_epoch(s: TrainState, epoch: int, state: EpochState, elapsed: float) -> None:
    """The steps' time and totals; an epoch a signal stopped between two steps is checkpointed: Interrupted."""
    state.seconds += elapsed
    s.train_seconds += elapsed
    state.reduce()
    if state.step < len(s.batches):
        _save(s, "last.pt", epoch - 1, state)
        raise _interrupted(s, epoch, state)


def end_epoch(s: TrainState, epoch: int, state: EpochState) -> bool:
    """Validate, log, examine, checkpoint; False when the run stops after this epoch."""
    train_loss, train_acc, val = _validate_and_log(s, epoch, state)
    first_bad = int(state.first_nonfinite.item())
    if first_bad >= 0 or not math.isfinite(train_loss):
        s.record.epoch_done(epoch, s.train_seconds, train_loss, train_acc, val.loss if val else None,
                            val.acc if val else None)
        _diverged(s, epoch, (epoch - 1) * len(s.batches) + max(first_bad, 0) + 1)
        return False
    diagnosis = _examine(s, epoch, train_loss, val)
    score = val.acc if val else float(epoch)  # without a validation split the last epoch stands in for the best
    loss = val.loss if val else -float(epoch)
    # a tie in accuracy (a small val set at 100%) goes to the lower loss, not always to the first epoch
    if score > s.best_acc or (score == s.best_acc and loss < s.best_loss):
        s.best_acc, s.best_loss, s.best_epoch = score, loss, epoch
    # best.pt before last.pt: a kill between the two resumes from the previous last.pt and redoes this
    # epoch, so whatever last.pt names as the best epoch is always in best.pt
    if s.best_epoch == epoch and s.run.trainer.checkpoints == "best_and_last":
        _save(s, "best.pt", epoch, val_acc=val.acc if val else None)
    elif s.best_epoch == epoch:  # trainer.checkpoints=last|none: the test's weights are kept here instead
        s.best_state = {k: v.detach().to("cpu", copy=True) for k, v in s.model.state_dict().items()}
    _save(s, "last.pt", epoch, val_acc=val.acc if val else None)
    s.record.best(s.best_epoch, s.best_acc if val else None)
    s.record.epoch_done(epoch, s.train_seconds, train_loss, train_acc, val.loss if val else None,
                        val.acc if val else None)
    if s.stopping():  # the signal came during validation or the save: stop at this boundary
        raise _interrupted(s, epoch, None)
    return _goes_on(s, epoch, diagnosis, val)


def _goes_on(s: TrainState, epoch: int, diagnosis: doctor.Diagnosis | None, val: Evaluation | None) -> bool:
    """Whether the run trains another epoch: not when pruned or stuck (with trainer.stop_when_stuck)."""
    if val and s.judge and distributed.broadcast(  # rank 0's verdict on every rank; every epoch is reported
            s.judge(epoch, {"val_acc": val.acc, "val_loss": val.loss, "best_val_acc": s.best_acc})):
        s.record.pruned(epoch)
        return False
    if diagnosis and diagnosis.stuck and s.run.trainer.stop_when_stuck:
        s.record.stuck(epoch)
        log.warning("trainer.stop_when_stuck: ending the run after epoch %d of %d", epoch, s.run.trainer.epochs)
        return False
    return True


def _validate_and_log(s: TrainState, epoch: int, state: EpochState) -> tuple[float, float, Evaluation | None]:
    """The epoch's validation, its metrics.csv row and tracker record, and its console line."""
    t, data = s.run.trainer, s.data
    train_loss, train_acc, seen = state.results()
    eval_tic = time.perf_counter()
    val = evaluate(s.model, data.val, s.ctx, t.eval_batch_size, s.spec.num_classes, data.workers) if data.val else None
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val.loss if val else "",
           "val_acc": val.acc if val else "", "lr": state.lr,
           "epoch_seconds": round(state.seconds + time.perf_counter() - eval_tic, 4),  # training + validation
           "images_per_second": round(seen / state.seconds, 1)}
    if t.test_every_epoch:  # after the timing: epoch_seconds stays training + validation
        test = evaluate(s.model, data.test, s.ctx, t.eval_batch_size, s.spec.num_classes, data.workers)
        row.update(test_loss=test.loss, test_acc=test.acc)
    if s.world.is_main:
        report.append_metrics(s.run_dir, row)
        s.trackers.log_epoch(row)
    val_text = f"val loss {val.loss:.4f} acc {val.acc:.2%}  " if val else ""
    val_text += f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%}  " if "test_acc" in row else ""
    log.info("epoch %d/%d  train loss %.4f acc %.2f%%  %slr %.3g  %.1fs  %.0f img/s", epoch, t.epochs,
             train_loss, 100 * train_acc, val_text, state.lr, row["epoch_seconds"], seen / state.seconds)
    return train_loss, train_acc, val


def _diverged(s: TrainState, epoch: int, step: int) -> None:
    """status: diverged, where, and the overrides of this config that make the steps tamer."""
    hints = doctor.divergence_hints(s.doctor)
    s.record.diverged(epoch, step, hints)
    log.error("training diverged: the loss became NaN/inf at step %d (epoch %d), so the run stopped there. "
              "Try %s.", step, epoch, ", ".join(hints))


def _examine(s: TrainState, epoch: int, train_loss: float, val: Evaluation | None) -> doctor.Diagnosis | None:
    """The doctor, after epoch 1, every trainer.doctor_every epochs (0: never), and after every epoch
    while its last finding stands; the lr it judges is the one applied now."""
    every, standing = s.run.trainer.doctor_every, s.record.summary.diagnosis
    # while a finding stands it is checked every epoch, so it is cleared as soon as the run recovers
    if not every or (epoch != 1 and epoch % every and not standing):
        return None
    settings = dataclasses.replace(s.doctor, applied_lr=s.optimizer.param_groups[0]["lr"])
    diagnosis = distributed.broadcast(  # rank 0's verdict, so every rank stops alike
        doctor.examine(s.model, s.probe.images, s.probe.labels, s.ctx, settings, epoch, train_loss, val))
    s.record.examined(diagnosis.to_dict() if diagnosis else None)
    if diagnosis:
        log.warning("%s", diagnosis.text())
    return diagnosis


# ------------------------------------------------------------------------------- finish


def finish(s: TrainState, draw: Drawing | None = None) -> None:
    """The test set, scored once with the weights that were best on validation; the run's plots, drawn by
    `draw` (at once by default; a fused group's members that end together side by side, and each is recorded
    finished by draw.wait(), once its figures are written)."""
    t, feature_maps, draw = s.run.trainer, None, draw or Drawing()
    if s.best_epoch:
        distributed.barrier()  # rank 0 has written best.pt
        weights, epoch = _best_weights(s)
        s.model.load_state_dict(weights)
        result = evaluate(s.model, s.data.test, s.ctx, t.eval_batch_size, s.spec.num_classes, s.data.workers)
        s.record.tested(result.loss, result.acc, "best" if s.data.val and epoch == s.best_epoch else "last")
        log.info("test (epoch %d weights): loss %.4f  accuracy %.2f%%", epoch, result.loss, 100 * result.acc)
        log.info("%s", report.per_class_text(result.confusion, s.spec.classes))
        if s.world.is_main:
            draw(report.write_confusion, s.run_dir, result.confusion, s.spec.classes)
            if s.prep.viz_layer:
                panels = head(s.data.test, s.run.viz.num_images, s.device)
                feature_maps = viz.draw_feature_maps(s.run_dir / "feature_maps.png", s.model, s.prep.viz_layer,
                                                     panels, s.ctx, s.spec.classes, s.run.viz.channels, s.run.model.label())
    if s.world.is_main:
        draw(report.plot_curves, s.run_dir, f"{s.run.model.label()} on {s.spec.name}", s.run.viz.curves == "error",
             s.best_epoch if s.run.trainer.test_every_epoch else None)
    draw.after(s.record.finished, feature_maps)


def _best_weights(s: TrainState) -> tuple[dict[str, torch.Tensor], int]:
    """The weights of the best epoch and that epoch: kept in memory (trainer.checkpoints=last|none), best.pt,
    or last.pt when that is the same epoch (a run of an older version killed between the two saves)."""
    if s.best_state is not None:
        return s.best_state, s.best_epoch
    for name in ("best.pt", "last.pt"):
        path = s.run_dir / "checkpoints" / name
        if path.is_file():
            ckpt = load_checkpoint(path, map_location=s.device)
            if ckpt["epoch"] == s.best_epoch:
                return ckpt["model"], s.best_epoch
    if s.run.trainer.checkpoints != "best_and_last":  # resumed: the best weights were in the stopped process
        log.warning("trainer.checkpoints=%s: the best epoch's (%d) weights went with the process that was stopped; "
                    "the test set is scored with the last epoch's", s.run.trainer.checkpoints, s.best_epoch)
        return s.model.state_dict(), s.record.summary.epochs_completed or s.done
    raise ConfigError(f"{s.run_dir / 'checkpoints'} holds no checkpoint of the best epoch ({s.best_epoch}), which "
                      f"the test score needs; resume from an earlier checkpoint or start the run again")
