"""A fused group's life: each member is opened as its own run (its directory, record, model, data,
optimizer, resume), the members train their epochs together, and each ends on its own.

Everything but the steps is fit()'s own code, called per member (fit.opened_run, end_epoch, finish),
so a member writes exactly the run directory its lone run writes. One member's ending is its own: a
member that diverges, gets stuck (trainer.stop_when_stuck), is pruned or fails is finished and taken
out of the group; the others go on in a group rebuilt without it. A signal checkpoints every member.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnlab import fit
from cnnlab.config import RunConfig
from cnnlab.distributed import World
from cnnlab.engine import settled
from cnnlab.fused.graph import GraphedSteps, graphable
from cnnlab.fused.logs import MemberLogs, job_log_files, routed
from cnnlab.fused.optim import Updates, member_updates
from cnnlab.fused.stacked import StackedModels
from cnnlab.fused.steps import Stepper, fused_epoch, loop_epoch, member_rng
from cnnlab.interrupt import GracefulStop, Interrupted
from cnnlab.record import RunRecord, Summary, claim
from cnnlab.report.drawing import side_by_side
from cnnlab.search.trial import EpochJudge
from cnnlab.trainstate import TrainState

log = logging.getLogger("cnnlab")


@dataclass
class Member:
    """One job of a group, opened: its run's state and what closes it."""

    tag: str  # "job 3": its lines on the console
    state: TrainState
    generator: torch.Generator  # its dropout stream: what the global RNG is to its lone run
    log_files: list[tuple[str, logging.Formatter | None]]
    closer: contextlib.ExitStack
    summary: Summary | None = None

    def close(self, err: BaseException | None = None) -> None:
        """The member's run ends: its record (failed, if err is a failure), trackers and directory lock."""
        self.closer.__exit__(type(err) if err else None, err, err.__traceback__ if err else None)
        self.summary = self.state.record.summary


def open_member(tag: str, run: RunConfig, run_dir: Path, overrides: list[str], record: RunRecord, world: World,
                judge: EpochJudge | None, stop: GracefulStop, shared: dict[str, Any]) -> Member:
    """Open one job for its group, inside the job's Hydra context (its train.log gets the set-up's lines).
    shared: what the group's members load once (fit.opened_run)."""
    closer = contextlib.ExitStack()
    try:
        closer.enter_context(claim(run_dir))
        state = closer.enter_context(fit.opened_run(run, run_dir, overrides, record, world, judge, stop, shared))
    except BaseException:
        closer.close()
        raise
    device = state.device
    generator = torch.Generator(device)
    generator.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
    return Member(tag, state, generator, job_log_files(), closer)


def train_group(members: list[Member], mode: str, jobs: list[int], graphs: bool = False) -> None:
    """Train the opened members to their ends; each member's summary is set. Raises Interrupted after a
    signal has checkpointed every member. mode: wide|vmap|loop (settings.py, steps.py); jobs: each member's job
    number; graphs: capture the fused step as a CUDA graph where it can be (graph.py)."""
    stopped: list[Interrupted] = []
    router = MemberLogs([m.log_files for m in members], [m.tag for m in members])
    with routed(router):
        if mode != "loop" and members[0].state.run.trainer.compile:
            log.info("trainer.compile: the fused step is not compiled (its one step for all members is the gain); "
                     "the members' own models are compiled where they step alone")
        positions: dict[tuple[int, int], list[tuple[Member, int]]] = {}
        for m, job in zip(members, jobs):  # members resumed at different points (one resumed alone) train in turn
            positions.setdefault((m.state.done, m.state.partial.step if m.state.partial else 0), []).append((m, job))
        for pairs in positions.values():
            part = [m for m, _ in pairs]
            _begin_part(part, mode, [job for _, job in pairs])
            _train_part(part, mode, graphs, router, members, stopped)
    if stopped:
        raise stopped[0]


def _train_part(part: list[Member], mode: str, graphs: bool, router: MemberLogs, everyone: list[Member],
                stopped: list[Interrupted]) -> None:
    active, epochs = list(part), part[0].state.run.trainer.epochs
    fused = _fused(active, mode, graphs) if mode != "loop" else None
    for epoch in range(part[0].state.done + 1, epochs + 1):
        if not active:
            break
        went_on = _epoch(active, epoch, fused, router, everyone, stopped)
        graphs = _graph_kept(fused, graphs)
        if len(went_on) != len(active) and fused is not None:
            form = fused.stacked.form
            fused.release()  # each member's tensors its own again; the group goes on without those that ended
            fused = None  # the old buffers go before the new ones are made
            fused = _fused(went_on, form, graphs) if went_on else None  # the form that ran: no retry of one refused
        for m in active:
            if m not in went_on and m.summary is None:  # ended (diverged, stuck, pruned), not failed or stopped
                _end([m], router, everyone)
        active = went_on
    if fused is not None:
        fused.release()
        fused = None  # its buffers and graph go before the members' test scores
    _end(active, router, everyone)


@dataclass
class Fused:
    """A part's members as one model and one optimizer step (captured as a CUDA graph where it can be)."""

    stacked: StackedModels
    updates: Updates
    graph: GraphedSteps | None = None

    def release(self) -> None:
        self.updates.release()
        self.stacked.release()


def _graph_kept(fused: Fused | None, graphs: bool) -> bool:
    """After an epoch: whether a group rebuilt from these members tries a graph. One that failed is dropped: the
    group stepped eagerly, and goes on so."""
    if fused is not None and fused.graph is not None and fused.graph.failed:
        fused.graph = None
        return False
    return graphs


def _fused(members: list[Member], mode: str, graphs: bool) -> Fused | None:
    """The members' models stacked as one with their optimizers fused, or None (each member steps in turn)
    where neither form runs them. mode wide tries the layers written out, then vmap; each member's
    summary says which form its group took, and whether its step is a CUDA graph."""
    for form in ("wide", "vmap") if mode == "wide" else ("vmap",):
        try:
            fused = _stacked(members, form, graphs)
        except Exception as err:  # noqa: BLE001 - whatever a form refuses, the members still train
            log.warning("this model cannot be fused %s (%s: %s); %s", _HOW[form], type(err).__name__,
                        (str(err).splitlines() or [""])[0][:300], "trying torch.func.vmap" if form == "wide" else
                        "the group's members step one after another instead (hydra.launcher.fuse=loop)")
            continue
        _record_mode(members, form)
        return fused
    _record_mode(members, "loop")
    return None


_HOW = {"wide": "layer by layer (hydra.launcher.fuse=wide)", "vmap": "with torch.func.vmap"}


def _stacked(members: list[Member], form: str, graphs: bool) -> Fused:
    """The members stacked in one form, checked against their own models, their optimizers fused."""
    stacked = None
    try:
        stacked = StackedModels([m.state.model for m in members], form)
        ctx = members[0].state.ctx
        probe = torch.stack([m.state.ctx.inputs(m.state.probe.images, train=False) for m in members])  # no draws
        stacked.check(probe, ctx)
        updates = member_updates(stacked.flat, [m.state for m in members], stacked.unused)
        streaming = any(m.state.data.loader == "streaming" for m in members)
        why = graphable(stacked, updates, ctx.device, ctx.bf16, streaming) if graphs else "hydra.launcher.cuda_graphs=false"
        if why and ctx.device.type == "cuda":
            log.info("the fused step runs eagerly, not as a CUDA graph: %s", why)
        return Fused(stacked, updates, None if why else GraphedSteps(stacked, updates, len(members), ctx.device))
    except BaseException:
        if stacked is not None:
            stacked.release()
        raise


def _begin_part(part: list[Member], mode: str, jobs: list[int]) -> None:
    """The members that train together, on the console and in their fused_group (named by the first); a part with
    no epochs left (stopped after its training) trains nothing here, and keeps the group that trained it."""
    if part[0].state.done >= part[0].state.run.trainer.epochs:
        return
    log.info("fused group of %d job%s (fuse=%s), training together: %s", len(part), "s" * (len(part) > 1), mode,
             ", ".join(m.tag for m in part))
    for m in part:
        m.state.record.built(fused_group={"group": min(jobs), "jobs": sorted(jobs), "mode": mode, "graph": False})


def _record_mode(members: list[Member], mode: str, graph: bool | None = None) -> None:
    """The form the members' group took; graph: some of their steps were replayed from a CUDA graph (None: as
    recorded so far). A graph built but never captured (too few full batches) is not claimed."""
    for m in members:
        was = m.state.record.summary.fused_group or {}
        now = {**was, "mode": mode, "graph": was.get("graph", False) if graph is None else graph}
        if now != was:  # summary.json written only where it changes (this runs after every graphed epoch)
            m.state.record.built(fused_group=now)


def _epoch(active: list[Member], epoch: int, fused: Fused | None, router: MemberLogs,
           everyone: list[Member], stopped: list[Interrupted]) -> list[Member]:
    """One epoch of the active members; returns those that go on to the next."""
    epochs = [fit.begin_epoch(m.state) for m in active]
    stepper = Stepper([m.state for m in active], epochs, [m.generator for m in active], active[0].state.stopping)
    if fused is not None:
        tic = time.perf_counter()
        fused_epoch(stepper, fused.stacked, fused.updates, fused.graph)
        if fused.graph is not None and fused.graph.replay is not None:  # before any member ends: its summary says so
            _record_mode(active, fused.stacked.form, True)
        seconds = [settled(active[0].state.device) - tic] * len(active)  # the members' one step took the group's time
    else:
        seconds = loop_epoch(stepper)  # each its own epoch's time
    went_on = []
    for m, state, elapsed in zip(active, epochs, seconds):
        try:
            with router.about(everyone.index(m)), member_rng(m.generator):
                fit.close_epoch(m.state, epoch, state, elapsed)
                if fit.end_epoch(m.state, epoch, state):
                    went_on.append(m)
        except Interrupted as err:  # checkpointed and recorded as interrupted
            stopped.append(err)
            m.close(err)
        except Exception as err:  # this member's failure is its own
            log.exception("%s failed; the rest of its group goes on", m.tag)
            m.close(err)
    return went_on


def _end(members: list[Member], router: MemberLogs, everyone: list[Member]) -> None:
    """The members' last phase (test score and plots), then each run is closed, failed or not. Members that
    end together draw their figures side by side in child processes (report/drawing.py), and each is
    recorded finished once its own are written."""
    with side_by_side(2 * len(members)) as drawings:  # a run's confusion matrix and curves
        begun = [(m, drawings()) for m in members]
        begun = [(m, draw) for m, draw in begun if _as_member(m, router, everyone, fit.finish, m.state, draw)]
        for m, draw in begun:
            if _as_member(m, router, everyone, draw.wait):
                m.close()


def _as_member(m: Member, router: MemberLogs, everyone: list[Member], fn: Callable[..., Any], *args: Any) -> bool:
    """fn(*args) with the member's log and RNG; False, the member failed and closed, where it raises."""
    try:
        with router.about(everyone.index(m)), member_rng(m.generator):
            fn(*args)
    except Exception as err:
        log.exception("%s failed", m.tag)
        m.close(err)
        return False
    return True
