"""The run record (summary.json written at the start and after every epoch, by one writer), the
dataset registry (one module adds a dataset), and the one interface of the two split kinds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab.checks import ConfigError
from cnnlab.data import DatasetConfig, DatasetSpec, FileSplit, Loaded, Split, load_dataset, register_dataset, spec_for
from cnnlab.data import registry
from cnnlab.data.batches import Batches, StreamingBatches
from cnnlab.record import RunRecord, Status, Summary, claim, is_live, read_summary
from cnnlab.report.sweep import load_runs


def read(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------- the record


def test_a_new_record_writes_from_its_first_event(tmp_path: Path) -> None:
    record = RunRecord.new(tmp_path, ["model=lenet"])
    assert not (tmp_path / "summary.json").exists()  # nothing before the run begins
    record.begin("lenet", "synthetic", {"trainer": {"epochs": 2}})
    first = read(tmp_path)
    assert first["status"] == "running" and first["model"] == "lenet" and first["overrides"] == ["model=lenet"]
    assert "epochs_completed" not in first and "best_epoch" not in first  # no progress yet, no nulls for it
    record.epoch_done(1, 1.23456, 2.0, 0.3, 1.9, 0.35)
    after = read(tmp_path)
    assert after["epochs_completed"] == 1 and after["train_seconds"] == 1.235 and after["final_val_acc"] == 0.35
    assert after["best_epoch"] is None and after["diagnosis"] is None  # null once an epoch is done: "none (yet)"
    record.tested(1.8, 0.4, "best")
    record.finished()
    done = read_summary(tmp_path)
    assert done.status == Status.COMPLETED == "completed" and done.test_acc == 0.4 and done.finished_at


def test_a_failure_before_the_run_begins_is_recorded_once_and_never_over_another_run(tmp_path: Path) -> None:
    RunRecord.new(tmp_path / "a", ["optimizer.lr=-1"]).failed(ConfigError("optimizer.lr=-1 is out of range"))
    failed = read(tmp_path / "a")
    assert failed["status"] == "failed" and "optimizer.lr" in failed["error"] and failed["overrides"] == ["optimizer.lr=-1"]

    other = tmp_path / "b"
    keep = RunRecord.new(other, [])
    keep.begin("lenet", "synthetic", {})
    keep.finished()
    before = (other / "summary.json").read_text()
    RunRecord.new(other, []).failed(RuntimeError("a second run into the same directory"))
    RunRecord.for_resume(other, []).failed(ConfigError("nothing to do"))  # a refused resume
    assert (other / "summary.json").read_text() == before


def test_a_resume_clears_the_previous_ending(tmp_path: Path) -> None:
    first = RunRecord.new(tmp_path, [])
    first.begin("lenet", "synthetic", {})
    first.epoch_done(1, 1.0, 2.0, 0.2, None, None)
    first.interrupted(2, 10, 1.5, "python -m cnnlab trainer.resume=...")
    assert read(tmp_path)["interrupted_at"] == {"epoch": 2, "step": 10}

    again = RunRecord.for_resume(tmp_path, ["trainer.resume=..."])
    assert again.summary.status == "interrupted"
    again.resumed(tmp_path / "checkpoints" / "last.pt", 1, 7, 3, ["trainer.resume=..."], {})
    resumed = read(tmp_path)
    assert resumed["status"] == "running" and "interrupted_at" not in resumed and "resume_command" not in resumed
    assert resumed["resumes"][0]["epoch"] == 1 and resumed["epochs_completed"] == 1


@pytest.mark.parametrize("epoch, moved", [(1, True), (3, False)])
def test_a_resume_keeps_the_fused_group_that_trained_the_run_so_far(tmp_path: Path, epoch: int, moved: bool) -> None:
    """fused_group is the group that trained a run last: a resume with epochs left moves it into its resumes entry
    (a group that takes the run on records its own); one with none left (stopped after its training) keeps it."""
    group = {"group": 0, "jobs": [0, 1], "mode": "wide", "graph": True}
    first = RunRecord.new(tmp_path, [])
    first.begin("lenet", "synthetic", {})
    first.built(fused_group=group)
    first.epoch_done(epoch, 1.0, 2.0, 0.2, None, None)
    first.interrupted(epoch, 0, 1.5, "python -m cnnlab trainer.resume=...")
    RunRecord.for_resume(tmp_path, []).resumed(tmp_path / "checkpoints" / "last.pt", epoch, 0, 3, [], {})
    resumed = read(tmp_path)
    assert resumed.get("fused_group") == (None if moved else group)
    assert resumed["resumes"][0].get("fused_group") == (group if moved else None)


def test_a_record_left_running_by_a_dead_process_reads_as_killed(tmp_path: Path) -> None:
    record = RunRecord.new(tmp_path, [])
    with claim(tmp_path):
        record.begin("lenet", "synthetic", {})
        assert is_live(tmp_path) and read_summary(tmp_path).status == Status.RUNNING
        with pytest.raises(ConfigError, match=f"run directory {tmp_path} is in use by cnnlab pid {os.getpid()}"):
            with claim(tmp_path):  # a second process (here: a second open file) is refused
                pass
    assert not is_live(tmp_path)
    assert read_summary(tmp_path).status == Status.KILLED == "killed"  # the file still says running
    assert read(tmp_path)["status"] == "running"
    (run,) = load_runs([tmp_path])
    assert run.status == "killed"  # and so does the sweep report


def test_summary_reads_files_of_other_versions() -> None:
    summary = Summary.from_dict({"status": "completed", "test_acc": 0.5, "a_key_from_the_future": 1})
    assert summary.test_acc == 0.5 and summary.final_metrics() == {"test_acc": 0.5}
    with pytest.raises(AttributeError):
        RunRecord.new(Path("."), []).built(no_such_field=1)


def test_a_run_killed_after_its_epochs_says_how_far_it_got(tmp_path: Path) -> None:
    """summary.json is written after every epoch: a process killed before the end (here: at the test
    score, with os._exit, which runs no cleanup) leaves status running with every epoch recorded."""
    run_dir = tmp_path / "run"
    code = ("import os, sys; import cnnlab.fit as t; t.finish = lambda state: os._exit(9); "
            "from cnnlab.__main__ import main; sys.argv[1:] = sys.argv[2:]; main()")
    done = subprocess.run([sys.executable, "-c", code, "-", "+debug=smoke", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 9, done.stderr[-2000:]
    summary = read(run_dir)
    assert summary["status"] == "running" and summary["epochs_completed"] == 2
    assert summary["best_epoch"] in (1, 2) and summary["params_total"] > 0 and "test_acc" not in summary
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs


# ------------------------------------------------------------------------------- the dataset registry


def _stripes_spec(cfg: DatasetConfig) -> DatasetSpec:
    return DatasetSpec("stripes", ("even", "odd"), 1, 6, 6, (0.5,), (0.25,))


def _stripes(cfg: DatasetConfig, spec: DatasetSpec) -> Loaded:
    """Class k: rows of value 40 + 170 * (row % 2 == k)."""
    def split(n: int) -> Split:
        labels = torch.arange(n) % 2
        rows = (torch.arange(6) % 2)[None, :] == labels[:, None]
        images = (40 + 170 * rows.to(torch.uint8))[:, None, :, None].expand(n, 1, 6, 6).contiguous()
        return Split(images.to(torch.uint8), labels)
    return Loaded(split(40), split(10))


@pytest.fixture
def stripes():
    register_dataset("stripes", spec=_stripes_spec, load=_stripes, train_size=40)
    yield
    del registry._REGISTRY["stripes"]


def test_one_registration_adds_a_dataset(stripes) -> None:
    assert "stripes" in registry.available()
    cfg = DatasetConfig(name="stripes", val_split=10, subset=30)
    assert spec_for(cfg).classes == ("even", "odd")
    data = load_dataset(cfg, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 10, 10)  # subset, then val carved out
    assert torch.equal(load_dataset(cfg, seed=0).val.labels, data.val.labels)  # seeded
    with pytest.raises(ConfigError, match="dataset.val_split=40 leaves no training examples"):
        DatasetConfig(name="stripes", val_split=40).validate()  # train_size checks before any load
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("stripes", spec=_stripes_spec, load=_stripes)


def test_a_registered_dataset_gets_the_common_checks(stripes, monkeypatch) -> None:
    wrong = lambda cfg, spec: Loaded(Split(torch.zeros(4, 3, 6, 6, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
                                     Split(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), torch.tensor([0, 5])))
    monkeypatch.setitem(registry._REGISTRY, "stripes", registry.DatasetEntry(DatasetConfig, _stripes_spec, wrong, None))
    with pytest.raises(ConfigError, match=r"train images are \(3, 6, 6\), expected \(1, 6, 6\)"):
        load_dataset(DatasetConfig(name="stripes"), seed=0)


# ------------------------------------------------------------------------------- the split interface


def test_both_split_kinds_answer_the_same_questions(tmp_path: Path) -> None:
    from PIL import Image

    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 1])
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    split, files = Split(images, labels), FileSplit(paths, labels, 3, (4, 4))
    assert split.resident and not files.resident and split.shape == files.shape == (3, 4, 4)
    assert split.nbytes == files.nbytes == 5 * 3 * 4 * 4
    index = torch.tensor([4, 1])
    for a, b in zip(split.take(index).batch(torch.arange(2)), files.take(index).batch(torch.arange(2))):
        assert torch.equal(a, b)
    assert torch.equal(split.head(3).images, files.head(3).images) and torch.equal(files.load().images, images)
    assert not issubclass(StreamingBatches, Batches)  # streaming is its own class, not an empty resident one
