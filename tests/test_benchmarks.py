"""The speed harness runs end to end on CPU, and the compiled training step matches the eager one.

Correctness only: speed is measured by `python -m benchmarks.epoch`, never asserted here.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision.transforms as T

from benchmarks.epoch import main, reference_transforms, setup
from cnnlab.checkpoint import load_checkpoint
from cnnlab.losses import build_loss
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.data.batches import Batches
from cnnlab.engine import EpochState, StepContext, run_steps

from conftest import run_cnnlab


def test_harness_runs_every_path_and_writes_its_table(tmp_path: Path) -> None:
    assert main(["+debug=smoke", "dataset.num_workers=1", "--epochs", "2", "--workers", "0,1",
                 "--variants", "fp32,cl,stream", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "lenet_synthetic_b32_cpu.csv")
    assert list(table["path"]) == ["reference, DataLoader num_workers=0", "reference, DataLoader num_workers=1",
                                   "cnnlab fp32", "bare model fp32", "cnnlab cl", "bare model cl", "cnnlab stream"]
    # streaming reads the same batches in the same order: the same trained weights, the same accuracy
    acc = table.set_index("path")["test_acc"]
    assert acc["cnnlab stream"] == acc["cnnlab fp32"]
    assert (table["epoch_seconds"] > 0).all() and (table["first_epoch_seconds"] > 0).all()
    # 7 batches of 32 per smoke epoch in every path
    assert list(table["images_per_second"]) == pytest.approx(list(224 / table["epoch_seconds"]), rel=1e-6)
    best_reference = table["epoch_seconds"].iloc[:2].min()
    assert list(table["speedup_vs_reference"]) == pytest.approx(list(best_reference / table["epoch_seconds"]))
    trained = table[~table["path"].str.startswith("bare")]
    assert trained["test_acc"].between(0, 1).all() and trained["data_stall"].between(0, 1).all()
    assert table.loc[table["path"].str.startswith("bare"), "test_acc"].isna().all()
    markdown = (tmp_path / "lenet_synthetic_b32_cpu.md").read_text()
    assert "### lenet on synthetic, batch 32, 2 epochs, CPU" in markdown and "| cnnlab fp32" in markdown


def test_reference_transforms_mirror_the_augmentation_list() -> None:
    bench = setup(["+debug=smoke", "augmentation=cifar", "dataset.image_size=32"], epochs=1)
    train, test = reference_transforms(bench, train=True), reference_transforms(bench, train=False)
    assert [type(op) for op in train.transforms] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train.transforms[0].padding == 4 and train.transforms[0].size == (32, 32)
    assert [type(op) for op in test.transforms] == [T.ToTensor, T.Normalize]  # random ops train only
    assert tuple(test.transforms[-1].mean) == tuple(bench.mean)


def _train(model: torch.nn.Module, step_model: torch.nn.Module, bench, epochs: int,
           after_epoch=lambda: None) -> list[float]:
    """Per-epoch mean losses of `step_model` (which trains `model`'s weights) on the smoke data."""
    t = bench.run.trainer
    generator = torch.Generator().manual_seed(0)
    ctx = StepContext(bench.pipeline, build_loss(bench.run.loss, bench.num_classes), torch.device("cpu"),
                      False, False, generator)
    batches = Batches(bench.train.images, bench.train.labels, t.batch_size, shuffle=True, drop_last=True,
                      generator=generator)
    optimizer = build_optimizer(bench.run.optimizer, model.parameters())
    scheduler = build_scheduler(bench.run.scheduler, optimizer, len(batches), epochs)
    losses = []
    for _ in range(epochs):
        state = run_steps(step_model, batches, ctx, optimizer, scheduler, EpochState.begin(batches, optimizer, ctx.device))
        losses.append(state.results()[0])
        after_epoch()
    return losses


def test_compiled_step_matches_eager_and_never_recompiles() -> None:
    from torch._dynamo.utils import counters

    bench = setup(["+debug=smoke"], epochs=2)
    eager, compiled = copy.deepcopy(bench.model), copy.deepcopy(bench.model)
    eager_losses = _train(eager, eager, bench, epochs=2)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled_losses = _train(compiled, torch.compile(compiled), bench, epochs=2,
                             after_epoch=lambda: graphs.append(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0 and graphs[1] == graphs[0]  # compiled in the first epoch, reused in the second
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for p, q in zip(eager.parameters(), compiled.parameters()):  # the compiled module trained the shared weights
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_compile_flag_trains_a_run_with_eager_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cnnlab("+debug=smoke", "trainer.compile=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["trainer"]["compile"] is True
    weights = load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]
    assert not any(key.startswith("_orig_mod") for key in weights)  # loads into the plain model
    assert summary["test_acc"] > 0.15  # it learned something: 10 classes, chance is 0.1


def test_sweep_benchmark_times_a_sweep_and_tables_it_against_one_by_one(tmp_path: Path) -> None:
    """benchmarks/sweep.py's pieces on two tiny sweeps: each a real command, its runs read back, the table
    comparing them (wall time ratio, agreement of the results) and the fused group's throughput."""
    from benchmarks.sweep import breakdown, sweep, table, throughput

    jobs = ["+debug=smoke", "trainer.epochs=1", "optimizer.lr=0.1,0.05"]
    alone = sweep("one by one", jobs, tmp_path, timeout=300)
    fused = sweep("fused", [*jobs, "hydra/launcher=fused"], tmp_path, timeout=300)
    assert alone["error"] is None and fused["error"] is None and len(fused["runs"]) == 2
    assert all(r["fused_group"]["jobs"] == [0, 1] for r in fused["runs"].values())
    rows = table([alone, fused], alone)
    assert rows[2].startswith("| one by one | 2 of 2 |") and "| 1.00x | - |" in rows[2]
    assert rows[3].startswith("| fused | 2 of 2 |") and rows[3].endswith("| 0.0000 |")  # loop on the CPU: equal results
    images = sum(r["train_size"] for r in fused["runs"].values())  # 1 epoch each; in a loop each its own time
    assert throughput(fused) == pytest.approx(images / sum(r["train_seconds"] for r in fused["runs"].values()))
    # the console is kept, with ms timestamps, and the fused sweep's wall time is broken down from it
    assert re.search(r"^\[\d\d:\d\d:\d\d\.\d{3}\] ", (fused["dir"] / "console.log").read_text(), re.M)
    parts = [float(x) for x in re.findall(r"([\d.]+) s", breakdown(fused))]
    start, epochs, steps, _, ends, report = parts  # the epochs hold the steps and the epochs' ends
    assert min(parts) >= 0 and steps <= epochs and start + epochs + ends + report == pytest.approx(fused["seconds"], abs=0.2)
    assert breakdown(alone).startswith("n/a")


def test_fused_step_benchmark_times_five_ways_and_counts_their_ops(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.fused_step import main as fused_step
    assert fused_step(["--members", "3", "--batch", "4", "--steps", "2", "--rounds", "1", "--optimizer", "adam"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    ops = {line.split()[0]: int(line.split()[-2]) for line in lines}
    assert list(ops) == ["alone", "vmap", "vmap+fused", "wide+fused", "wide+graph"]
    assert ops["vmap+fused"] < ops["vmap"] < ops["alone"]  # one optimizer step for all takes the most out
    assert ops["wide+fused"] < ops["vmap+fused"]  # without vmap's batching ops
    # on the CPU the captured function is called, not a graph: the wide step and its counting, copied input
    assert ops["wide+fused"] < ops["wide+graph"] < ops["wide+fused"] + 40


def test_fused_probe_benchmark_times_three_ways_that_reach_the_same_weights(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/fused_probe.py (the source of fused_probe_cpu.md and the H100 probe table): N LeNets one
    after another, through vmap and grouped by hand; on the CPU both fused ways end at the sequential weights."""
    from benchmarks.fused_probe import main as fused_probe
    assert fused_probe(["--members", "2", "--batch", "4", "--steps", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["sequential", "vmap", "grouped"]
    assert all(float(line.split()[-1]) < 1e-4 for line in lines[1:])  # worst relative weight difference
