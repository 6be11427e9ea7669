"""Fused sweeps (hydra/launcher=fused): each member of a group trains as it does alone, writes the run
directory a lone job writes, and ends on its own (diverged, failed, stopped), on real Fashion-MNIST.

The group tests open members in this process with the code the launcher uses (fused/group.py) and
compare them with fit() of the same configs; the launcher's tests run the real command line."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cnnlab.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.distributed import world_from_env
from cnnlab import fit as fit_module
from cnnlab.fit import fit
from cnnlab.fused.group import open_member, train_group
from cnnlab.fused.stacked import StackedModels
from cnnlab.interrupt import GracefulStop
from cnnlab.record import RunRecord

from conftest import FASHION_MNIST_SYSTEM_DIR, FRAGILE, compose_config, run_cnnlab
from test_sweeps import WRAPPER

DATA = ("dataset=fashion_mnist", f"dataset.root={FASHION_MNIST_SYSTEM_DIR}", "dataset.download=false",
        "dataset.subset=1200", "model=lenet", "trainer.epochs=2", "trainer.device=cpu", "augmentation=flip",
        "optimizer.lr=0.02")
# one member per kind of difference a group allows (fused/grouping.py's MEMBER_KEYS)
MEMBERS = {
    "base": (),
    "lr_momentum": ("optimizer.lr=0.05", "optimizer.momentum=0.5"),
    "weight_decay": ("optimizer.weight_decay=0.005",),
    "mse": ("loss=mse",),
    "label_smoothing": ("loss.label_smoothing=0.1",),
    "dropout": ("model.dropout=0.3",),
    "seed": ("trainer.seed=1",),  # its own weights, validation split, data order and flips
    "activation": ("model.activation=tanh",),
    "schedule": ("scheduler.pct_start=0.1",),
}
CURVES = ["train_loss", "train_acc", "val_loss", "val_acc"]


def train_together(root: Path, members: dict[str, tuple[str, ...]], mode: str, extra: tuple[str, ...] = ()) -> dict:
    """Open the members as the launcher does and train them as one group; their run dirs by name."""
    stop, shared, opened = GracefulStop(), {}, []
    for name, overrides in members.items():
        run = validate(compose_config(*DATA, *extra, *overrides))
        run_dir = root / name
        run_dir.mkdir(parents=True)
        opened.append(open_member(name, run, run_dir, list(overrides), RunRecord.new(run_dir, list(overrides)),
                                  world_from_env(), None, stop, shared))
    train_group(opened, mode, list(range(len(opened))))
    return {name: root / name for name in members}


def train_alone(root: Path, name: str, overrides: tuple[str, ...], extra: tuple[str, ...] = ()) -> Path:
    run = validate(compose_config(*DATA, *extra, *overrides))
    fit(run, root / name, list(overrides))
    return root / name


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("alone")
    return {name: train_alone(root, name, overrides) for name, overrides in MEMBERS.items()}


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def relative_gap(a: pd.DataFrame, b: pd.DataFrame) -> float:
    return float(((a[CURVES] - b[CURVES]).abs() / a[CURVES].abs().clip(lower=1e-12)).to_numpy().max())


def test_in_a_loop_every_member_is_bitwise_its_lone_run(tmp_path: Path, alone: dict[str, Path]) -> None:
    fused = train_together(tmp_path, MEMBERS, "loop")
    for name, run_dir in fused.items():
        pd.testing.assert_frame_equal(metrics(run_dir)[["epoch", "lr", *CURVES]], metrics(alone[name])[["epoch", "lr", *CURVES]])
        assert summary(run_dir)["test_acc"] == summary(alone[name])["test_acc"]
        assert summary(run_dir)["fused_group"] == {"group": 0, "jobs": list(range(len(MEMBERS))), "mode": "loop",
                                                   "graph": False}


@pytest.mark.parametrize("form", ["vmap", "wide"])
def test_fused_every_member_matches_its_lone_run_to_float_tolerance(tmp_path: Path, alone: dict[str, Path],
                                                                    form: str) -> None:
    """One wide step for all, through vmap or with the layers written out: convolutions grouped, sums in
    another order, so equal to float tolerance. Dropout masks, data order and augmentation are drawn
    exactly as alone (bitwise on the CPU)."""
    fused = train_together(tmp_path, MEMBERS, form)
    gaps = {name: relative_gap(metrics(run_dir), metrics(alone[name])) for name, run_dir in fused.items()}
    assert max(gaps.values()) < 1e-4, gaps  # 1e-3 is the promise; here vmap ~1e-5, wide ~2e-6
    for name, run_dir in fused.items():
        assert abs(summary(run_dir)["test_acc"] - summary(alone[name])["test_acc"]) <= 1e-3
        assert summary(run_dir)["fused_group"]["mode"] == form
        # a member's weights are rows of the group's stacked tensors; its checkpoint holds its own alone
        weights = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in weights.values())


GRAPHED = {k: v for k, v in MEMBERS.items() if k != "dropout"}  # a captured step draws no dropout


def train_graphed(root: Path, members: dict, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...] = (),
                  simulate: bool = True) -> dict:
    """The group as train_together trains it in wide form, with its full batches through GraphedSteps: on the
    CPU its captured function is called in place of a graph (simulate), or the capture is tried for real."""
    from cnnlab.fused import graph, group

    monkeypatch.setattr(group, "graphable", lambda *args: None)  # as on CUDA
    monkeypatch.setattr(group, "GraphedSteps", lambda *args, **kw: graph.GraphedSteps(*args, **{**kw, "simulate": simulate}))
    stop, shared, opened = GracefulStop(), {}, []
    for name, overrides in members.items():
        run = validate(compose_config(*DATA, *extra, *overrides))
        (root / name).mkdir(parents=True)
        opened.append(open_member(name, run, root / name, list(overrides), RunRecord.new(root / name, list(overrides)),
                                  world_from_env(), None, stop, shared))
    train_group(opened, "wide", list(range(len(opened))), graphs=True)
    return {name: root / name for name in members}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_captured_step_trains_each_member_as_the_eager_fused_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   optimizer: str) -> None:
    """The step a CUDA graph replays (fused/graph.py: static input, the optimizer's numbers set on the host before
    each replay, the sums flushed at each eager step) gives each member the eager fused step's weights bitwise;
    the train loss is summed in another order. Members differ in lr, momentum, weight decay, loss, seed (their
    own batches), activation and schedule (an lr that changes every step)."""
    from cnnlab.fused.graph import WARMUP, GraphedSteps

    extra = ("optimizer=adamw", "optimizer.lr=0.002") if optimizer == "adamw" else ()
    members = {k: v for k, v in GRAPHED.items() if optimizer == "sgd" or k not in ("lr_momentum", "weight_decay")}
    eager = train_together(tmp_path / "eager", members, "wide", extra)
    replays, captured = [], GraphedSteps._captured
    monkeypatch.setattr(GraphedSteps, "_captured", lambda self, *a: (replays.append(1), captured(self, *a))[1])
    graphed = train_graphed(tmp_path / "graphed", members, monkeypatch, extra)
    steps = len(metrics(eager["base"])) * (summary(eager["base"])["train_size"] // 64)
    # every full batch but the warm-up's (each epoch's last, partial, eagerly), and the graph's one check before it
    # is trusted: the captured function run eagerly, and a replay, the state put back after each
    assert len(replays) == steps - WARMUP + 2
    for name, run_dir in graphed.items():
        a, b = metrics(run_dir), metrics(eager[name])
        pd.testing.assert_frame_equal(a[["epoch", "lr", "train_acc", "val_loss", "val_acc"]],
                                      b[["epoch", "lr", "train_acc", "val_loss", "val_acc"]])
        assert ((a["train_loss"] - b["train_loss"]).abs() <= 1e-6 * b["train_loss"].abs()).all()
        assert summary(run_dir)["fused_group"]["graph"] is True and summary(eager[name])["fused_group"]["graph"] is False
        assert summary(run_dir)["test_acc"] == summary(eager[name])["test_acc"]


def test_the_steps_time_is_read_once_the_device_has_run_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA step returns before its kernels run, and a captured step is one launch: the epoch's training time
    (epoch_seconds, images_per_second; lone runs, fused groups and loops alike) is read after a synchronize."""
    import time

    from cnnlab import engine

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (waited.append(device), time.sleep(0.2)))
    tic = time.perf_counter()
    assert engine.settled(torch.device("cuda", 0)) - tic >= 0.2 and waited == [torch.device("cuda", 0)]
    engine.settled(torch.device("cpu"))
    assert waited == [torch.device("cuda", 0)]  # nothing to wait for on the CPU


def test_a_graph_never_captured_is_not_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few full batches to get past the warm-up: every step ran eagerly, and fused_group.graph says so."""
    from cnnlab.fused import graph

    monkeypatch.setattr(graph, "WARMUP", 10**6)
    members = {k: GRAPHED[k] for k in ("base", "mse")}
    for name, run_dir in train_graphed(tmp_path, members, monkeypatch).items():
        assert summary(run_dir)["status"] == "completed" and len(metrics(run_dir)) == 2
        assert summary(run_dir)["fused_group"]["graph"] is False and summary(run_dir)["fused_group"]["mode"] == "wide"


def test_a_member_diverging_inside_the_captured_step_is_found_at_its_step(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first bad step is counted in the graph's sums and flushed in order: it is recorded diverged at the step
    the eager group records, and the others go on (in a group rebuilt, and captured again, without it) exactly
    as in the eager group."""
    from cnnlab.fused import graph

    members = {"calm": (), "wild": ("optimizer.lr=1e6",), "other": ("trainer.seed=1",)}
    extra = ("scheduler=none",)
    eager = train_together(tmp_path / "eager", members, "wide", extra)
    monkeypatch.setattr(graph, "WARMUP", 1)  # lr=1e6 gives NaN at the 3rd step: inside the graph's steps
    graphed = train_graphed(tmp_path / "graphed", members, monkeypatch, extra)
    wild, wild_eager = summary(graphed["wild"]), summary(eager["wild"])
    assert wild["status"] == wild_eager["status"] == "diverged" and wild["diverged_step"] == wild_eager["diverged_step"]
    assert wild["diverged_step"] > graph.WARMUP + 1  # after the warm-up and the captured step: found by the graph
    for name in ("calm", "other"):
        a, b = metrics(graphed[name]), metrics(eager[name])
        assert len(a) == 2 and summary(graphed[name])["status"] == "completed"
        pd.testing.assert_frame_equal(a[["epoch", "train_acc", "val_loss", "val_acc"]], b[["epoch", "train_acc", "val_loss", "val_acc"]])


def test_a_signal_between_replays_checkpoints_what_the_eager_step_would(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop after some steps through the graph: the graph's counts are flushed into each member's epoch before
    its checkpoint, which holds the eager group's position, counts and weights (the loss sum to float order)."""
    from cnnlab.interrupt import Interrupted

    members = {k: GRAPHED[k] for k in ("base", "mse", "seed")}
    partial = {}
    for way in ("eager", "graphed"):
        calls = iter(range(10**6))
        monkeypatch.setattr(GracefulStop, "requested", lambda self: next(calls) == 9)  # before the 10th step
        with pytest.raises(Interrupted):
            if way == "eager":
                train_together(tmp_path / way, members, "wide")
            else:
                train_graphed(tmp_path / way, members, monkeypatch)
        partial[way] = {name: load_checkpoint(tmp_path / way / name / "checkpoints" / "last.pt") for name in members}
    for name in members:
        a, b = partial["graphed"][name], partial["eager"][name]
        assert a["partial"]["step"] == b["partial"]["step"] == 9 and a["partial"]["seen"] == b["partial"]["seen"]
        assert torch.equal(a["partial"]["correct"], b["partial"]["correct"])
        assert torch.equal(a["partial"]["first_nonfinite"], b["partial"]["first_nonfinite"])
        assert torch.allclose(a["partial"]["loss_sum"], b["partial"]["loss_sum"], rtol=1e-6)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.parametrize("how, said", [
    ("capture fails", "could not be captured as a CUDA graph"),  # tried for real here, without CUDA
    ("replay differs", "captured as a CUDA graph did not step as it does eagerly"),  # a graph that does nothing
])
def test_a_step_that_cannot_be_captured_steps_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, how: str, said: str) -> None:
    """A capture that fails, or a graph whose one checked replay does not write what the eager step writes: the
    group says so once, records graph false, and trains on eagerly, with exactly the eager step's results."""
    from cnnlab.fused.graph import GraphedSteps

    if how == "replay differs":
        capture = GraphedSteps._capture
        monkeypatch.setattr(GraphedSteps, "_capture", lambda self, *a: (capture(self, *a), setattr(self, "replay", lambda: None))[0])
    members = {k: GRAPHED[k] for k in ("base", "mse", "seed")}
    eager = train_together(tmp_path / "eager", members, "wide")
    with caplog.at_level("WARNING", logger="cnnlab"):
        tried = train_graphed(tmp_path / "tried", members, monkeypatch, simulate=how == "replay differs")
    assert sum(said in r.getMessage() for r in caplog.records) == 1
    for name, run_dir in tried.items():
        pd.testing.assert_frame_equal(metrics(run_dir)[["epoch", "lr", *CURVES]], metrics(eager[name])[["epoch", "lr", *CURVES]])
        assert summary(run_dir)["fused_group"]["graph"] is False and summary(run_dir)["status"] == "completed"


def test_a_diverging_member_is_masked_and_the_others_go_on_untouched(tmp_path: Path) -> None:
    """Its NaNs never reach the others: they train exactly as in a group without it."""
    members = {"calm": (), "wild": ("optimizer.lr=1e6",), "other": ("trainer.seed=1",)}
    extra = ("scheduler=none",)
    fused = train_together(tmp_path / "fused", members, "vmap", extra)
    wild = summary(fused["wild"])
    assert wild["status"] == "diverged" and wild["epochs_completed"] == 1
    assert wild["diverged_epoch"] == 1 and "optimizer.lr" in " ".join(wild["hints"])
    assert len(metrics(fused["wild"])) == 1
    without = train_together(tmp_path / "without", {k: v for k, v in members.items() if k != "wild"}, "vmap", extra)
    for name in ("calm", "other"):
        assert summary(fused[name])["status"] == "completed"
        assert len(metrics(fused[name])) == 2  # epoch 2 ran in a group rebuilt without "wild"
        assert relative_gap(metrics(fused[name]), metrics(without[name])) < 1e-6
        assert summary(fused[name])["test_acc"] == summary(without[name])["test_acc"]


def test_a_member_that_fails_alone_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in one member's own phase (here its epoch's end: say, its disk is full) is recorded for it;
    the group goes on without it."""
    end_epoch = fit_module.end_epoch

    def breaks_for_one(state, epoch, epoch_state):
        if state.run_dir.name == "broken" and epoch == 1:
            raise OSError("no space left on device")
        return end_epoch(state, epoch, epoch_state)

    monkeypatch.setattr(fit_module, "end_epoch", breaks_for_one)
    fused = train_together(tmp_path, {"fine": (), "broken": ("optimizer.lr=0.05",), "other": ("trainer.seed=1",)}, "vmap")
    broken = summary(fused["broken"])
    assert broken["status"] == "failed" and "no space left on device" in broken["error"]
    assert [summary(fused[name])["status"] for name in ("fine", "other")] == ["completed", "completed"]
    assert all(len(metrics(fused[name])) == 2 for name in ("fine", "other"))


def test_the_doctor_examines_each_member_and_a_stuck_one_is_dropped(tmp_path: Path) -> None:
    """trainer.stop_when_stuck: the sigmoid + MSE member at a tiny lr is stuck at chance after epoch 1 and
    ends there, scored; the other member trains its 3 epochs."""
    members = {"stuck": ("model.activation=sigmoid", "loss=mse", "optimizer.lr=0.001"), "fine": ()}
    fused = train_together(tmp_path, members, "vmap", ("trainer.stop_when_stuck=true", "trainer.epochs=3"))
    stuck, fine = summary(fused["stuck"]), summary(fused["fine"])
    assert stuck["status"] == "stuck" and stuck["stopped_at_epoch"] == 1 and stuck["diagnosis"]["stuck"]
    assert stuck["test_acc"] is not None and "collapsed" in [f["code"] for f in stuck["diagnosis"]["findings"]]
    assert fine["status"] == "completed" and fine["epochs_completed"] == 3 and not (fine.get("diagnosis") or {}).get("stuck")


def small_net(activation: nn.Module, frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), activation, nn.Linear(8, 3))
    net[1].weight.requires_grad_(not frozen)
    return net


class FP32:
    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@pytest.mark.parametrize("form", ["vmap", "wide"])
def test_what_the_fused_model_cannot_follow_is_refused_so_the_group_steps_in_a_loop(form: str) -> None:
    """The template follows the activations it knows per member; a user's own that differs between members,
    or members of another structure, are caught before a step (group.py then trains them in a loop)."""
    x = torch.randn(2, 4, 16)
    StackedModels([small_net(nn.ReLU()), small_net(nn.Tanh())], form).check(x, FP32())  # known: followed per member
    with pytest.raises(ValueError, match="fused outputs differ from its own model's"):
        StackedModels([small_net(nn.ELU()), small_net(nn.Mish())], form).check(x, FP32())
    with pytest.raises(ValueError, match="other parameters or buffers"):
        StackedModels([small_net(nn.ReLU()), nn.Sequential(nn.Flatten(), nn.Linear(16, 3))], form)


@pytest.mark.parametrize("family", ["lenet", "resnet20", "resnet18", "vgg11", "nin", "cifarnet", "convnet5", "googlenet"])
def test_the_wide_form_trains_each_canon_family_as_its_members_or_refuses_it(family: str) -> None:
    """Written out layer by layer, a step of 2 members (their own initial weights, BatchNorm in training
    mode) gives each member its own model's outputs, gradients and running statistics. In float64, so
    that only the math can differ: in float32 the gradients of these deep nets at initialisation stray
    from the float64 ones by up to 1e-1 (relative to the largest), alone, through vmap and wide alike.
    GoogLeNet joins its branches over channels (torch.cat), which the wide form cannot follow: refused."""
    from cnnlab.models import build_model
    run = validate(compose_config(f"model={family}", "dataset=synthetic", "dataset.image_size=32", "model.dropout=0"))
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model(run.model, 3, 10, (32, 32)).double())
    own = [copy.deepcopy(m).train() for m in models]
    x = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    stacked = StackedModels(models, "wide")
    if family == "googlenet":
        with pytest.raises(ValueError, match="fused outputs differ from its own model's"):
            stacked.check(x, FP32())
        return
    stacked.check(x, FP32())
    stacked.train()
    stacked.zero_grad()
    out = stacked.forward(x, [])
    w = torch.randn(out.shape[1:], dtype=torch.float64)  # not a plain sum, whose gradient through BatchNorm is ~0
    stacked.flat.backward((out * w).sum())
    for i, model in enumerate(own):
        mine = model(x[i])
        (mine * w).sum().backward()
        torch.testing.assert_close(out[i], mine, rtol=1e-9, atol=1e-12)
        for (name, p), fused in zip(model.named_parameters(), models[i].parameters()):
            torch.testing.assert_close(fused.grad, p.grad, rtol=1e-8, atol=1e-12, msg=name)
        for (name, b), fused in zip(model.named_buffers(), models[i].buffers()):
            torch.testing.assert_close(fused, b, rtol=1e-9, atol=1e-12, msg=name)


MIXNET = '''
import torch
from torch import nn

class MixNet(nn.Module):
    """Two branches joined over channels, as an Inception block joins them: the wide form cannot follow it."""
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(in_channels, 4, 3, padding=1), nn.Conv2d(in_channels, 4, 5, padding=2)
        self.channels = in_channels
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, num_classes))
    def forward(self, x):
        assert x.shape[1] == self.channels  # fails on the wide form's [B, N*C, H, W], with no message
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))
'''


def test_the_wide_form_refuses_what_it_cannot_follow_and_the_group_takes_vmap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Layers with weights it does not know, weights of the model's own, its own random draws and code
    that expects a member's channels are refused by the wide form (code that mixes channels: the canon
    test's GoogLeNet); the group then trains through vmap, each member as alone."""
    with pytest.raises(ValueError, match="LayerNorm\\) has weights the wide form does not know"):
        StackedModels([nn.Sequential(nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3)) for _ in range(2)], "wide")
    with pytest.raises(ValueError, match="Dropout2d\\) draws its own random numbers"):
        StackedModels([nn.Sequential(nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)], "wide")
    scaled = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)]
    for model in scaled:
        model.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="has weights of its own, outside its layers"):
        StackedModels(scaled, "wide")

    class Drops(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(super().forward(x), 0.5, self.training)

    with pytest.raises(ValueError, match="draws random numbers in its forward"):
        StackedModels([Drops(nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)], "wide").check(torch.randn(2, 4, 16), FP32())
    (tmp_path / "mixnet.py").write_text(MIXNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    members = {"base": ("optimizer.lr=0.05",), "other": ("optimizer.lr=0.01",)}
    extra = ("model=custom", "model._target_=mixnet.MixNet", "trainer.epochs=1")
    fused = train_together(tmp_path / "fused", members, "wide", extra)
    for name, overrides in members.items():
        lone = train_alone(tmp_path / "alone", name, overrides, extra)
        assert summary(fused[name])["fused_group"]["mode"] == "vmap"
        assert relative_gap(metrics(fused[name]), metrics(lone)) < 1e-4
    assert "cannot be fused layer by layer (hydra.launcher.fuse=wide) (AssertionError: ); trying torch.func.vmap" \
        in caplog.text


def test_a_frozen_parameter_stays_frozen_in_a_fused_step() -> None:
    models = [small_net(nn.ReLU(), frozen=True) for _ in range(2)]
    frozen = [m[1].weight.detach().clone() for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    stacked = StackedModels(models)
    stacked.train()
    stacked.zero_grad()
    stacked.flat.backward(stacked.forward(torch.randn(2, 4, 16), []).sum())
    for optimizer in optimizers:
        optimizer.step()
    assert all(torch.equal(m[1].weight, f) for m, f in zip(models, frozen)) and models[0][1].weight.grad is None
    assert not torch.equal(models[0][3].weight, small_net(nn.ReLU())[3].weight)  # the rest trained


SMOKE = ("+debug=smoke", "trainer.epochs=2")
CONTRACT = ("model=custom", "model._target_=fragile.Fragile", "+model.fragile=0,1", "optimizer.lr=0.05,0.01")


def job_files(job: Path) -> set[str]:
    return {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_a_fused_sweep_writes_what_the_basic_launcher_writes(tmp_path: Path) -> None:
    """Same jobs, both launchers: the same exit status, job directories, files, report rows and results;
    summary.json differs in its fused_group only. fragile=1's group fails as a whole, as each job alone."""
    (tmp_path / "fragile.py").write_text(FRAGILE)
    done = {}
    for launcher in ("basic", "fused"):
        extra = ("hydra/launcher=fused", "hydra.launcher.fuse=vmap") if launcher == "fused" else ()
        done[launcher] = run_cnnlab("-m", *SMOKE, *CONTRACT, *extra, f"hydra.sweep.dir={tmp_path / launcher}", cwd=tmp_path)
        assert done[launcher].returncode == 1, done[launcher].stderr[-3000:]  # as any sweep with failed jobs
        assert "2 of 4 jobs failed" in done[launcher].stderr
    basic, fused = tmp_path / "basic", tmp_path / "fused"
    jobs = sorted(p.name for p in basic.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == sorted(p.name for p in fused.iterdir() if p.is_dir() and not p.name.startswith(".")) and len(jobs) == 4
    for job in jobs:
        b, f = summary(basic / job), summary(fused / job)
        assert f["status"] == b["status"] and job_files(fused / job) == job_files(basic / job)
        if b["status"] == "completed":
            assert f["fused_group"] == {"group": 0, "jobs": [0, 1], "mode": "vmap", "graph": False} and "fused_group" not in b
            assert set(f) - {"fused_group"} == set(b) and abs(f["test_acc"] - b["test_acc"]) < 1e-6
            pd.testing.assert_frame_equal(metrics(fused / job)[CURVES], metrics(basic / job)[CURVES], rtol=1e-4)
            assert "fused group of 2 jobs (fuse=vmap)" in (fused / job / "train.log").read_text()
        else:
            assert "the fragile model broke" in f["error"]
    table = {launcher: pd.read_csv(tmp_path / launcher / "sweep_summary.csv") for launcher in ("basic", "fused")}
    assert list(table["fused"]["status"]) == list(table["basic"]["status"])
    np.testing.assert_allclose(table["fused"]["test_acc"].astype(float), table["basic"]["test_acc"].astype(float), atol=1e-6)
    assert "fused launcher: group 2 of 2" in done["fused"].stderr + done["fused"].stdout


@pytest.fixture(scope="module")
def smoke_alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The resume test's three jobs, never stopped, one by one (the basic launcher): its job dirs by name."""
    root = tmp_path_factory.mktemp("smoke_alone")
    done = run_cnnlab("-m", *SMOKE, "optimizer.lr=0.1,0.05,0.01", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep"


# test_sweeps' wrapper sends SIGTERM at the Nth training batch drawn. auto on the CPU is loop, bitwise
# alone: members train their epochs in turn (7 batches each), so batch 30 is member 1's 2nd of epoch 2.
# vmap and wide: members with one seed draw one batch per step for all, so batch 10 is step 3 of epoch 2.
@pytest.mark.parametrize("fuse, rtol, at", [("auto", 0, 30), ("vmap", 1e-4, 10), ("wide", 1e-4, 10)])
def test_a_stopped_fused_sweep_resumes_every_member(tmp_path: Path, smoke_alone: Path, fuse: str, rtol: float,
                                                    at: int) -> None:
    """SIGTERM in the middle of epoch 2 checkpoints every member; one member is resumed alone from its
    checkpoint, and the same command finishes the rest. Each ends as it would never stopped (alone)."""
    sweep = tmp_path / "sweep"
    command = ("-m", *SMOKE, "optimizer.lr=0.1,0.05,0.01", "hydra/launcher=fused", f"hydra.launcher.fuse={fuse}")
    env = {**os.environ, "STEP": str(at), "DO": "SIGTERM", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    stopped = subprocess.run([sys.executable, "-c", WRAPPER, "-", *command, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Continue with: python -m cnnlab" in stopped.stdout + stopped.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [summary(j)["status"] for j in jobs] == ["interrupted"] * 3
    assert all((j / "checkpoints" / "last.pt").is_file() for j in jobs)

    one = run_cnnlab(f"trainer.resume={jobs[1]}", cwd=tmp_path)  # a member's checkpoint resumes alone
    assert one.returncode == 0, one.stderr[-3000:]
    again = run_cnnlab(*command, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{jobs[1].name}: completed in an earlier run of this sweep; kept as it is" in again.stdout
    # fused_group: the group that trained a run last; each resume keeps the one the run had
    first = {"group": 0, "jobs": [0, 1, 2], "mode": "loop" if fuse == "auto" else fuse, "graph": False}
    assert "fused_group" not in summary(jobs[1]) and summary(jobs[1])["resumes"][-1]["fused_group"] == first
    at = {n: (summary(jobs[n])["resumes"][-1]["epoch"], summary(jobs[n])["resumes"][-1]["step"]) for n in (0, 2)}
    # in a loop member 0 was stopped after its training, member 2 before its epoch 2; fused, both at one step
    assert (at[0][0], at[2][0]) == ((2, 1) if fuse == "auto" else (1, 1)) and (fuse == "auto") == (at[0] != at[2])
    for n in (0, 2):
        resume = summary(jobs[n])["resumes"][-1]
        if at[n][0] == 2:  # nothing left to train: no group took it on
            assert summary(jobs[n])["fused_group"] == first and "fused_group" not in resume
        else:  # the members resumed at one point train together
            together = [k for k in (0, 2) if at[k] == at[n]]
            assert summary(jobs[n])["fused_group"] == {**first, "group": together[0], "jobs": together}
            assert resume["fused_group"] == first
            said = f"fused group of {len(together)} job{'s' * (len(together) > 1)} (fuse={first['mode']}), training " \
                   f"together: {', '.join(f'job {k}' for k in together)}"
            assert said in (jobs[n] / "train.log").read_text()
    for job in jobs:
        assert summary(job)["status"] == "completed" and len(summary(job)["resumes"]) >= 1
        pd.testing.assert_frame_equal(metrics(job)[["epoch", *CURVES]], metrics(smoke_alone / job.name)[["epoch", *CURVES]],
                                      check_exact=not rtol, rtol=rtol or 1e-5)


@pytest.mark.parametrize("setting, message", [
    ("hydra.launcher.fuse=warp", "hydra.launcher.fuse='warp' is not valid; choose one of: auto, wide, vmap, loop"),
    ("hydra.launcher.max_members=0", "hydra.launcher.max_members=0 must be a whole number >= 1"),
    ("hydra.launcher.memory_fraction=1.5", "hydra.launcher.memory_fraction=1.5 must be a number in (0, 1]"),
    ("hydra.launcher.cuda_graphs=often", "hydra.launcher.cuda_graphs='often' must be true or false"),
    ("+hydra.launcher.colour=1", "hydra.launcher.colour is not a setting of hydra/launcher=fused"),
    ("hydra.launcher.fuse=wide,loop", "hydra.launcher.fuse=wide,loop: Hydra's own settings (hydra.* and hydra/...) "
                                      "take one value per command"),  # Hydra: exit 1 and its own words
])
def test_bad_launcher_settings_are_refused_before_anything_runs(tmp_path: Path, setting: str, message: str) -> None:
    done = run_cnnlab("-m", *SMOKE, "optimizer.lr=0.1,0.05", "hydra/launcher=fused", setting,
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("setting, groups", [
    ("hydra.launcher.max_members=2", [[0, 1], [2]]),
    ("hydra.launcher.memory_fraction=1e-9", [[0], [1], [2]]),  # no step fits that: every job alone
])
def test_groups_are_capped_by_size_and_by_memory(tmp_path: Path, setting: str, groups: list[list[int]]) -> None:
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", *SMOKE, "trainer.epochs=1", "optimizer.lr=0.1,0.05,0.01", "hydra/launcher=fused", setting,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {int(p.parent.name.split("_")[0]): summary(p.parent).get("fused_group") for p in sweep.glob("*/summary.json")}
    assert all(summary(p.parent)["status"] == "completed" for p in sweep.glob("*/summary.json")) and len(found) == 3
    for group in groups:
        for job in group:
            assert found[job] == ({"group": group[0], "jobs": group, "mode": "loop", "graph": False} if len(group) > 1 else None)


def test_a_groups_data_leaves_its_training_steps_their_memory(tmp_path: Path) -> None:
    """dataset.loader=auto places a member's image files on the device only in what the group's training steps,
    by the launcher's estimate, leave free."""
    from cnnlab.build import training_step_bytes
    from cnnlab.memory import gigabytes
    from test_folders import make_folder

    root = make_folder(tmp_path / "images", {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}}, size=(16, 16))
    data = ("dataset=image_folder", f"dataset.root={root}", "dataset.val_split=0.25", "model=lenet", "trainer.epochs=1",
            "trainer.batch_size=4", "trainer.device=cpu")
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", *data, "optimizer.lr=0.1,0.05", "hydra/launcher=fused", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _, need = training_step_bytes(validate(compose_config(*data)))
    for job in sorted(sweep.glob("[01]_*")):
        assert summary(job)["status"] == "completed" and summary(job)["loader"] == "resident"
    log = (sweep / "0_lr-0.1" / "train.log").read_text()
    assert f"free on cpu, {gigabytes(2 * need)} of it kept for the fused group's training steps)" in log


def test_on_cuda_a_captured_step_counts_its_graphs_activations_in_the_memory_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph's pool keeps a step's activations while an epoch's last, eager, batch takes its own: with
    cuda_graphs each member counts them twice (the device is only named CUDA here; nothing runs on it)."""
    from cnnlab.build import training_step_bytes
    from cnnlab.fused import launcher
    from cnnlab.fused.settings import FusedSettings

    job = compose_config(*SMOKE)
    found, need = training_step_bytes(validate(job))
    assert found.activation_bytes() > 0
    free = (2 * need + found.activation_bytes()) / 0.8  # room for two members' steps, not with their graphs' too
    monkeypatch.setattr(launcher, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(launcher, "available_bytes", lambda device: free)
    configs = [job] * 4
    eager = launcher._by_memory([0, 1, 2, 3], configs, FusedSettings(cuda_graphs=False))
    graphed = launcher._by_memory([0, 1, 2, 3], configs, FusedSettings())
    assert eager == [([0, 1], 2 * need), ([2, 3], 2 * need)]
    assert graphed == [([i], need + found.activation_bytes()) for i in range(4)]


def test_a_search_fuses_each_batch_of_trials(tmp_path: Path) -> None:
    """hydra/sweeper=optuna asks n_jobs trials at a time; the fused launcher trains each batch as a group."""
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", *SMOKE, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                      "optimizer.lr=tag(log, interval(0.001, 0.1))", "hydra/launcher=fused", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    groups = sorted(summary(p.parent)["fused_group"]["jobs"] for p in sweep.glob("*/summary.json"))
    assert groups == [[0, 1], [0, 1], [2, 3], [2, 3]]
    trials = pd.read_csv(sweep / "search_trials.csv")
    assert list(trials["state"]) == ["complete"] * 4 and (sweep / "search_summary.md").is_file()



def test_a_signal_while_a_group_opens_its_jobs_stops_opening_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs opened so far are trained (and so checkpointed and stopped at once); the rest are left for the
    next run of the command, as the jobs of later groups are."""
    import signal

    from hydra.core.utils import JobReturn
    from omegaconf import OmegaConf

    from cnnlab.fused import launcher
    from cnnlab.fused.session import current
    from cnnlab.fused.settings import FusedSettings

    calls = []

    def run(context: object, task: object, config: object) -> JobReturn:
        session, num = current(), int(config.hydra.job.num)
        calls.append(("train" if session.training else "open", num))
        if not session.training:
            session.members[num] = None
            session.stop.signum = signal.SIGTERM  # as the handler sets it
        return JobReturn()

    monkeypatch.setattr(launcher, "_run", run)
    configs = [OmegaConf.create({"hydra": {"job": {"num": i}}}) for i in range(3)]
    launcher._fused(FusedSettings(), None, None, configs, [0, 1, 2], 0.0)
    assert calls == [("open", 0), ("train", 0)]
