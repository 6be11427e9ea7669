"""`cnnlab evaluate` and `cnnlab predict` on a real smoke run: numbers checked against the run's own
files and against a forward pass of the checkpoint's model written out here by hand."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnnlab import evaluate, predict
from cnnlab.checkpoint import load_checkpoint
from cnnlab.config import validate
from cnnlab.data import load_dataset
from cnnlab.inference import open_run
from cnnlab.losses import MSEConfig
from cnnlab.build import prepare

from conftest import run_cnnlab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real smoke run (synthetic 3x16x16 images, 10 classes, 128 test images) for the module."""
    base = tmp_path_factory.mktemp("evaluate")
    run = base / "run"
    proc = run_cnnlab("+debug=smoke", f"hydra.run.dir={run}", cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def run_files(run_dir: Path) -> dict[str, str]:
    """Every file of the run except eval/ outputs, with its hash: evaluate must leave them as they are."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "eval" not in p.relative_to(run_dir).parts}


def hand_built(run_dir: Path, checkpoint: str = "best"):
    """The checkpoint's model, config and test set, built the way train.fit builds them (not via cnnlab.inference)."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    run = validate(OmegaConf.create(ckpt["config"]))
    prep = prepare(run)
    prep.model.load_state_dict(ckpt["model"])
    prep.model.eval()
    return run, prep, ckpt


@torch.no_grad()
def probabilities(prep, images: torch.Tensor) -> torch.Tensor:
    return prep.model(prep.pipeline(images, train=False)).softmax(dim=1)


def read_summary(out: Path) -> dict:
    return json.loads((out / "eval_summary.json").read_text())


# ------------------------------------------------------------------------------- evaluate


def test_evaluate_defaults_reproduce_the_runs_test_score(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = run_files(run_dir)
    assert evaluate.main([f"run={run_dir}"]) == 0
    printed = capsys.readouterr().out
    out = run_dir / "eval" / "synthetic_best"
    run_summary = json.loads((run_dir / "summary.json").read_text())
    summary = read_summary(out)

    # same weights, same test set: the very same score as the run's summary.json
    assert summary["accuracy"] == run_summary["test_acc"]
    assert summary["loss"] == pytest.approx(run_summary["test_loss"], rel=1e-6)
    assert summary["run_test_acc"] == run_summary["test_acc"]
    assert summary["test_size"] == run_summary["test_size"] == 128
    assert summary["checkpoint"] == str((run_dir / "checkpoints" / "best.pt").resolve())
    assert summary["checkpoint_epoch"] == run_summary["best_epoch"]
    assert (summary["dataset"], summary["model"], summary["device"]) == ("synthetic", "lenet", "cpu")
    assert summary["overrides"] == [f"run={run_dir}"] and summary["seconds"] >= 0

    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert confusion.equals(pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0))
    assert int(confusion.to_numpy().sum()) == 128
    per_class = pd.read_csv(out / "per_class_accuracy.csv")
    assert per_class.equals(pd.read_csv(run_dir / "per_class_accuracy.csv"))
    assert (out / "confusion_matrix.png").read_bytes().startswith(PNG_MAGIC)

    assert f"accuracy  {run_summary['test_acc']:.2%}" in printed
    assert f"{run_summary['test_loss']:.4f}" in printed
    for row in per_class.itertuples():  # every class's accuracy ("class_3  83.33%  (10/12)")
        assert f"\n  {row._1}  {row.accuracy:7.2%}  ({row.correct}/{row.total})" in printed
    assert f"files: {out}" in printed
    assert run_files(run_dir) == before


def test_evaluate_last_checkpoint_on_a_subset(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = run_files(run_dir)
    assert evaluate.main([f"run={run_dir}", "checkpoint=last", "dataset.subset=50"]) == 0
    out = run_dir / "eval" / "synthetic_last_subset=50"
    summary = read_summary(out)
    assert summary["test_size"] == 50 and summary["dataset_config"]["subset"] == 50
    assert summary["checkpoint"].endswith("last.pt") and "run_test_acc" not in summary

    # against a hand-built forward pass of last.pt on the same 50 images
    run, prep, ckpt = hand_built(run_dir, "last")
    assert summary["checkpoint_epoch"] == ckpt["epoch"] == run.trainer.epochs
    run.dataset.subset = 50
    test = load_dataset(run.dataset, seed=run.trainer.seed).test
    predicted = probabilities(prep, test.images).argmax(1)
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (test.labels.numpy(), predicted.numpy()), 1)
    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0).to_numpy()
    assert (confusion == expected).all() and confusion.sum() == 50
    assert summary["accuracy"] == pytest.approx((predicted == test.labels).float().mean().item())

    # out= elsewhere; eval_batch_size changes speed, not results
    custom = tmp_path / "elsewhere"
    assert evaluate.main([f"run={run_dir}", "checkpoint=last", "dataset.subset=50", f"out={custom}",
                          "trainer.eval_batch_size=7", "trainer.device=cpu"]) == 0
    assert read_summary(custom)["accuracy"] == summary["accuracy"]
    assert read_summary(custom)["eval_batch_size"] == 7
    assert sorted(p.name for p in custom.iterdir()) == [
        "confused_pairs.csv", "confusion_matrix.csv", "confusion_matrix.png", "eval_summary.json",
        "per_class_accuracy.csv"]
    assert run_files(run_dir) == before
    capsys.readouterr()


def test_evaluate_checkpoint_path_and_device_fallback(run_dir: Path, tmp_path: Path) -> None:
    """checkpoint=<file>; a run trained on a device absent here is scored on the one that is."""
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    ckpt["config"]["trainer"]["device"] = "mps"  # absent on the Linux machines the tests run on
    moved = tmp_path / "elsewhere.pt"
    torch.save(ckpt, moved)
    out = tmp_path / "out"
    assert evaluate.main([f"run={run_dir}", f"checkpoint={moved}", f"out={out}"]) == 0
    summary = read_summary(out)
    assert summary["checkpoint"] == str(moved.resolve())
    assert any("trainer.device=mps" in note for note in summary["notes"])
    if summary["device"] == "cpu":  # auto: a GPU, where present, may differ in the last bits
        assert summary["accuracy"] == json.loads((run_dir / "summary.json").read_text())["test_acc"]


@pytest.mark.parametrize("args, expected", [
    (["dataset=mnist"], "1 channel(s) vs 3"),
    (["dataset.image_size=8"], "images of 3x8x8 after the run's augmentation vs 3x16x16"),
    (["dataset.num_classes=5"], "5 classes vs 10"),
])
def test_evaluate_refuses_a_dataset_that_does_not_fit(run_dir: Path, capsys: pytest.CaptureFixture,
                                                      args: list[str], expected: str) -> None:
    assert evaluate.main([f"run={run_dir}", *args]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model, trained on synthetic (3x16x16, 10 classes)" in err and expected in err
    assert len(err.strip().splitlines()) == 1  # one paragraph


@pytest.mark.parametrize("args, expected", [
    (["run={tmp}/missing"], "does not exist"),
    (["run={tmp}"], "is not a cnnlab run: it has no checkpoints"),
    ([], "run=<run directory> is required"),
    (["run={run}", "checkpoint=middle"], "choose one of: best, last (this run has: best, last)"),
    (["run={run}", "checkpoint={tmp}/garbage.pt"], "not a readable checkpoint"),
    (["run={run}", "dataset=imagenet1k"], "is not a dataset config; choose one of: cifar10, cifar100"),
    (["run={run}", "dataset.name=mnist"], "pick another dataset with dataset=<name>"),
    (["run={run}", "dataset.colour=1"], "Valid keys of dataset 'synthetic'"),
    (["run={run}", "dataset.subset=0"], "dataset.subset=0 is out of range"),
    (["run={run}", "epochs=3"], "unknown argument 'epochs'; valid arguments: run, checkpoint, dataset"),
    (["run={run}", "best"], "argument 'best' is not key=value"),
    (["run={run}", "trainer.device=tpu"], "trainer.device='tpu' is not valid"),
    (["run={run}", "out={tmp}/garbage.pt"], "is not a writable folder"),
])
def test_evaluate_bad_input(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                            args: list[str], expected: str) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab evaluate: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def test_pngs(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """The run's first 6 test images as PNG (lossless: the pixels read back are the same), 2 in a subfolder."""
    folder = tmp_path_factory.mktemp("pngs")
    run, _, _ = hand_built(run_dir)
    images = load_dataset(run.dataset, seed=run.trainer.seed).test.images[:6]
    (folder / "nested").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / ("nested" if i >= 4 else "") / f"img_{i}.png")
    (folder / "notes.txt").write_text("not an image: folder scans skip it")
    return folder, images


def read_csv_rows(path: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["path"], []).append(row)
    return rows


def test_predict_matches_a_forward_pass(run_dir: Path, test_pngs, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    folder, images = test_pngs
    files = [folder / "img_0.png", folder / "img_1.png", folder / "nested" / "img_5.png"]
    out = tmp_path / "sub" / "pred.csv"
    argv = [f"run={run_dir}", f"images={','.join(map(str, files[:2]))}", f"images={files[2]}", "k=3", f"out={out}"]
    assert predict.main(argv) == 0
    printed = capsys.readouterr().out

    _, prep, _ = hand_built(run_dir)
    expected = probabilities(prep, images[[0, 1, 5]])
    classes = prep.spec.classes
    rows = read_csv_rows(out)
    assert list(rows) == [str(f) for f in files]
    for path, probs in zip(files, expected):
        got = rows[str(path)]
        assert [int(r["rank"]) for r in got] == [1, 2, 3]
        top = probs.topk(3)
        assert [int(r["index"]) for r in got] == top.indices.tolist()
        assert [r["class"] for r in got] == [classes[i] for i in top.indices]
        values = [float(r["probability"]) for r in got]
        assert values == pytest.approx(top.values.tolist(), rel=1e-5)
        assert values == sorted(values, reverse=True) and sum(values) <= 1 + 1e-6
        # the console shows the same, aligned under each path
        block = printed.split(f"{path}\n", 1)[1].splitlines()[:3]
        assert block[0].split() == ["1.", classes[top.indices[0]], f"{top.values[0].item():.2%}"]
        assert len({line.rindex("%") for line in block}) == 1  # probabilities right-aligned
    assert f"csv: {out.resolve()}" in printed and "top 3 of 10 classes for 3 image(s)" in printed


def test_predict_folder_caps_k(run_dir: Path, test_pngs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, images = test_pngs
    out = tmp_path / "pred.csv"
    assert predict.main([f"run={run_dir}", f"images={folder}", "k=50", f"out={out}"]) == 0
    assert "top 10 of 10 classes for 6 image(s)" in capsys.readouterr().out
    rows = read_csv_rows(out)
    # recursive, sorted, images only
    assert list(rows) == sorted(str(p) for p in folder.rglob("*.png"))
    _, prep, _ = hand_built(run_dir)
    expected = probabilities(prep, images)
    for i, path in enumerate(sorted(folder.rglob("*.png"), key=lambda p: int(p.stem.split("_")[1]))):
        got = rows[str(path)]
        assert len(got) == 10  # k capped at the class count
        assert sum(float(r["probability"]) for r in got) == pytest.approx(1, abs=1e-5)
        assert int(got[0]["index"]) == int(expected[i].argmax())


def test_predict_explains_probabilities_of_raw_mse_outputs(run_dir: Path) -> None:
    opened = open_run(run_dir)
    opened.run.loss = MSEConfig(softmax=False)
    text = predict.format_predictions(opened, [predict.Prediction("a.png", [3], [0.5])], 1)
    assert "not calibrated probabilities" in text and "class_3" in text


@pytest.mark.parametrize("args, expected", [
    (["run={tmp}/missing", "images={png}"], "run={tmp}/missing does not exist"),
    (["run={run}", "images={tmp}/missing.png"], "images={tmp}/missing.png does not exist"),
    (["run={run}"], "images=<file|folder>[,<file>...] is required"),
    (["run={run}", "images={png}", "k=0"], "k=0 is out of range: it must be >= 1"),
    (["run={run}", "images={png}", "k=two"], "k=two must be a whole number >= 1"),
    (["run={run}", "images={png},{tmp}/broken.png"], "1 of 2 image(s) could not be read"),
    (["run={run}", "images={tmp}/empty"], "the folder holds no image files"),
    (["run={run}", "images={png}", "out={tmp}"], "is a folder; give a file path"),
    (["run={run}", "images={png}", "dataset=mnist"], "unknown argument 'dataset'"),
])
def test_predict_bad_input(run_dir: Path, test_pngs, tmp_path: Path, capsys: pytest.CaptureFixture,
                           args: list[str], expected: str) -> None:
    (tmp_path / "broken.png").write_bytes(PNG_MAGIC + b"truncated")
    (tmp_path / "empty").mkdir()
    fmt = {"tmp": tmp_path, "run": run_dir, "png": test_pngs[0] / "img_0.png"}
    assert predict.main([a.format(**fmt) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab predict: ") and expected.format(**fmt) in err, err
    if "broken" in args[-1]:
        assert str(tmp_path / "broken.png") in err  # the unreadable file is named


# ------------------------------------------------------------------------------- the command lines


def test_command_lines(run_dir: Path, test_pngs, tmp_path: Path) -> None:
    """The subcommand form `cnnlab evaluate`, `python -m cnnlab.predict`, and --help, as subprocesses."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    proc = cli("cnnlab", "evaluate", f"run={run_dir}", f"out={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr
    assert read_summary(tmp_path / "ev")["accuracy"] == json.loads((run_dir / "summary.json").read_text())["test_acc"]

    proc = cli("cnnlab.predict", f"run={run_dir}", f"images={test_pngs[0] / 'img_0.png'}", "k=2")
    assert proc.returncode == 0, proc.stderr
    assert "top 2 of 10 classes for 1 image(s)" in proc.stdout

    proc = cli("cnnlab", "predict", "--help")
    assert proc.returncode == 0 and "usage: cnnlab predict run=<run dir> images=" in proc.stdout

    proc = cli("cnnlab.evaluate", f"run={tmp_path / 'nope'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
