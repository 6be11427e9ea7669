"""Resident vs streaming data: the same batches either way, and the automatic choice between them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from cnnlab.data import Split
from cnnlab.data.datasets import FileSplit
from cnnlab.distributed import World
from cnnlab.data import batches
from cnnlab.data.batches import Batches, StreamingBatches, choose_loader
from cnnlab.engine import StepContext, evaluate

from conftest import run_cnnlab


def _split(n: int = 50, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                 torch.randint(0, 5, (n,), generator=g))


def _stats(batches) -> list[tuple[int, float, float, int]]:
    """Per batch: size, pixel mean and std, label sum. Equal lists mean equal batches, in order."""
    out = []
    for images, labels in batches:
        x = images.float()
        out.append((len(labels), round(x.mean().item(), 4), round(x.std().item(), 4), int(labels.sum())))
    return out


def _pair(split: Split | FileSplit, resident: Split, workers: int, world: World = World(), seed: int = 3):
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    a = Batches(resident.images, resident.labels, 8, shuffle=True, drop_last=True, generator=g1, world=world)
    b = StreamingBatches(split, 8, torch.device("cpu"), workers, shuffle=True, drop_last=True, generator=g2, world=world)
    return a, b


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_batches_equal_resident_batches(workers):
    split = _split()
    resident, streaming = _pair(split, split, workers)
    assert len(resident) == len(streaming) == 6
    for _ in range(2):  # two epochs: a fresh order each, the same on both paths
        order_a, order_b = resident.order(), streaming.order()
        assert torch.equal(order_a, order_b)
        a, b = list(resident.take(order_a)), list(streaming.take(order_b))
        assert _stats(a) == _stats(b)
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    # a resumed epoch starts at a later batch on both paths alike
    order = resident.order()
    assert _stats(resident.take(order, 4)) == _stats(streaming.take(order.clone(), 4))
    assert len(list(streaming.take(order, 4))) == 2


def test_each_rank_takes_its_slice_of_every_global_batch():
    split = _split(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    whole = list(Batches(split.images, split.labels, 8, world=World()).take(order))
    halves = [list(StreamingBatches(split, 8, torch.device("cpu"), 0, world=World(rank, 2, rank)).take(order))
              for rank in (0, 1)]
    for full, first, second in zip(whole, *halves):
        assert len(first[1]) == len(second[1]) == 4
        assert torch.equal(torch.cat([first[0], second[0]]), full[0])
        assert torch.equal(torch.cat([first[1], second[1]]), full[1])


def _write_pngs(split: Split, folder: Path) -> FileSplit:
    folder.mkdir()
    paths = []
    for i, image in enumerate(split.images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)  # lossless: the same pixels back
        paths.append(path)
    return FileSplit(paths, split.labels.clone(), 3, (8, 8))


def test_image_files_stream_through_workers_as_the_same_batches(tmp_path):
    split = _split(24)
    files = _write_pngs(split, tmp_path / "images")
    assert torch.equal(files.load().images, split.images)
    resident, streaming = _pair(files, split, workers=2)
    order = resident.order()
    assert torch.equal(order, streaming.order())
    assert _stats(resident.take(order)) == _stats(streaming.take(order))


def test_evaluate_gives_the_same_result_on_files_and_on_resident_tensors(tmp_path):
    split = _split(30)
    files = _write_pngs(split, tmp_path / "images")
    spec_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    from cnnlab.data import DatasetSpec
    from cnnlab.data.augment import AugmentationConfig, build_pipeline
    from cnnlab.losses import CrossEntropyConfig, build_loss

    spec = DatasetSpec("t", tuple("abcde"), 3, 8, 8, (0.5,) * 3, (0.25,) * 3)
    ctx = StepContext(build_pipeline(AugmentationConfig(), spec), build_loss(CrossEntropyConfig(), 5),
                            torch.device("cpu"), False, False, None)
    a = evaluate(spec_model, split, ctx, 7, 5)
    b = evaluate(spec_model, files, ctx, 7, 5, num_workers=2)
    assert a.confusion.sum() == b.confusion.sum() == 30
    assert (a.confusion == b.confusion).all() and a.loss == pytest.approx(b.loss, rel=1e-6)


def test_auto_loader_streams_when_the_data_exceeds_the_memory_budget(monkeypatch):
    cpu, split = torch.device("cpu"), _split(10)
    files = FileSplit([Path("x.png")] * 1000, torch.zeros(1000, dtype=torch.long), 3, (64, 64))  # 12.3 MB decoded
    assert choose_loader("streaming", [split], cpu) == "streaming"
    assert choose_loader("resident", [files], cpu) == "resident"
    assert choose_loader("auto", [split, None], cpu) == "resident"  # already in RAM: nothing to gain by streaming
    monkeypatch.setattr(batches, "_free_memory", lambda device: 100e6)
    assert choose_loader("auto", [files, None], cpu) == "resident"  # 12.3 MB <= half of 100 MB
    monkeypatch.setattr(batches, "_free_memory", lambda device: 20e6)
    assert choose_loader("auto", [files, None], cpu) == "streaming"  # 12.3 MB > half of 20 MB
    monkeypatch.setattr(batches, "_free_memory", lambda device: 100e6)
    # a fused group's training steps keep 80 MB: 12.3 MB > half of the 20 MB left
    assert choose_loader("auto", [files, None], cpu, reserved=80e6) == "streaming"
    assert batches._free_memory(cpu) > 0  # the real probe reads this host's available memory


def test_default_workers_decode_files_and_leave_in_memory_tensors_to_the_main_process():
    files = FileSplit([Path("x.png")], torch.zeros(1, dtype=torch.long), 3, (8, 8))
    assert batches.stream_workers(None, _split()) == 0
    assert batches.stream_workers(None, files) == min(8, os.cpu_count() or 1)
    assert batches.stream_workers(3, _split()) == batches.stream_workers(3, files) == 3


def test_streaming_run_writes_the_same_results_as_a_resident_run(tmp_path):
    """The whole run, end to end: identical metrics, test accuracy and confusion matrix."""
    dirs = {}
    for loader in ("resident", "streaming"):
        dirs[loader] = tmp_path / loader
        result = run_cnnlab("+debug=smoke", f"dataset.loader={loader}", "dataset.num_workers=1",
                            "augmentation=flip", f"hydra.run.dir={dirs[loader]}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in dirs.items()}
    assert summaries["resident"]["loader"] == "resident" and summaries["streaming"]["loader"] == "streaming"
    assert summaries["resident"]["test_acc"] == summaries["streaming"]["test_acc"]
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(dirs["resident"] / "metrics.csv")[columns],
                                  pd.read_csv(dirs["streaming"] / "metrics.csv")[columns])
    assert (dirs["resident"] / "confusion_matrix.csv").read_text() == (dirs["streaming"] / "confusion_matrix.csv").read_text()


def test_bad_loader_settings_are_clear_errors(tmp_path):
    result = run_cnnlab("+debug=smoke", "dataset.loader=disk", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "dataset.loader='disk' is not valid; choose one of: auto, resident, streaming" in result.stdout + result.stderr
    result = run_cnnlab("+debug=smoke", "dataset.num_workers=-1", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 2 and "dataset.num_workers=-1 is out of range" in result.stdout + result.stderr
