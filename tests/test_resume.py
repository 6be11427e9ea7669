"""Exact resume and extend, interruption, atomic saves, divergence, gradient clipping, determinism."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cnnlab.checkpoint import load_checkpoint, save_checkpoint
from cnnlab.interrupt import GracefulStop
from cnnlab.data.batches import Batches
from cnnlab.engine import EpochState, StepContext, run_steps
from conftest import run_cnnlab

SMOKE = ("+debug=smoke", "scheduler=step")  # a schedule that does not depend on trainer.epochs
RESULT_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]  # all but timings


def train(tmp_path: Path, name: str, *overrides: str) -> Path:
    run_dir = tmp_path / name
    done = run_cnnlab(*overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")[RESULT_COLUMNS]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = (load_checkpoint(p / "checkpoints" / "last.pt")["model"] for p in (a, b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_two_epochs_plus_two_resumed_equal_four_bitwise(tmp_path: Path) -> None:
    straight = train(tmp_path, "straight", *SMOKE, "trainer.epochs=4")
    resumed = train(tmp_path, "resumed", *SMOKE, "trainer.epochs=2")
    hydra_record = (resumed / ".hydra" / "overrides.yaml").read_text()
    continued = run_cnnlab(f"trainer.resume={resumed}", "trainer.epochs=4", cwd=tmp_path)
    assert continued.returncode == 0, continued.stderr

    pd.testing.assert_frame_equal(metrics(straight), metrics(resumed))  # one continuous log, epochs 1..4
    assert list(metrics(resumed)["epoch"]) == [1, 2, 3, 4]
    assert_same_weights(straight, resumed)
    a, b = summary(straight), summary(resumed)
    for key in ("status", "test_acc", "test_loss", "best_epoch", "best_val_acc", "epochs_completed"):
        assert a[key] == b[key], key
    assert b["resumes"][0]["epoch"] == 2 and b["resumes"][0]["overrides"][-1] == "trainer.epochs=4"
    assert b["config"]["trainer"]["epochs"] == 4 and b["config"]["scheduler"]["name"] == "step"
    assert (resumed / ".hydra" / "overrides.yaml").read_text() == hydra_record  # the original record stays
    log = (resumed / "train.log").read_text()
    assert "epoch 2/2" in log and "resumed" in log and "epoch 4/4" in log  # both sessions, one log
    assert not (tmp_path / "outputs").exists()  # the resume wrote into its run, not a new directory


def test_extending_a_finished_one_cycle_run_replans_the_schedule(tmp_path: Path) -> None:
    run_dir = train(tmp_path, "run", "+debug=smoke", "trainer.epochs=2")
    first = summary(run_dir)
    done = run_cnnlab(f"trainer.resume={run_dir / 'checkpoints' / 'last.pt'}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    extended = summary(run_dir)
    assert extended["status"] == "completed" and extended["epochs_completed"] == 3
    assert extended["started_at"] == first["started_at"]
    table = metrics(run_dir)
    assert list(table["epoch"]) == [1, 2, 3]
    assert table["lr"].iloc[2] > 0  # the one-cycle plan over 3 epochs, not the 2-epoch plan's end


# SIGTERM arrives during the 10th training step, whatever the machine's load: the run sends it to itself
# from inside the step (a real signal, through the real handler), instead of a test sleeping and hoping.
SIGTERM_AT_STEP_10 = (
    "import os, signal, sys; import cnnlab.engine as e; inputs, n = e.StepContext.inputs, [0]\n"
    "def step(self, images, train):\n"
    "    n[0] += train\n"
    "    if train and n[0] == 10: os.kill(os.getpid(), signal.SIGTERM)\n"
    "    return inputs(self, images, train)\n"
    "e.StepContext.inputs = step\n"
    "from cnnlab.__main__ import main; sys.argv[1:] = sys.argv[2:]; main()")


def test_sigterm_checkpoints_at_a_step_and_the_resume_is_exact(tmp_path: Path) -> None:
    big = (*SMOKE, "dataset.train_size=30000", "trainer.epochs=2")
    run_dir = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AT_STEP_10, "-", *big, f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, output
    state = summary(run_dir)
    assert state["status"] == "interrupted", output
    assert state["interrupted_at"]["epoch"] == 1 and state["interrupted_at"]["step"] == 10  # the step it came in
    assert f"trainer.resume={run_dir}" in output
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["partial"]["step"] == ckpt["step"] == state["interrupted_at"]["step"]

    done = run_cnnlab(f"trainer.resume={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    straight = train(tmp_path, "straight", *big)
    pd.testing.assert_frame_equal(metrics(straight), metrics(run_dir))
    assert_same_weights(straight, run_dir)
    assert summary(run_dir)["status"] == "completed" and "interrupted_at" not in summary(run_dir)


def test_second_ctrl_c_aborts_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)  # Python's default; a pytest-xdist worker ignores SIGINT
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_ctrl_c_on_the_command_line_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """No checkpoint is waited for: the run is recorded interrupted at its last checkpoint, and the command says
    how to go on instead of printing Python's traceback."""
    twice = SIGTERM_AT_STEP_10.replace("os.kill(os.getpid(), signal.SIGTERM)",
                                       "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", twice, "-", *SMOKE, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "stopped by Ctrl-C" in proc.stderr
    assert summary(run_dir)["status"] == "interrupted"


def test_a_run_whose_summary_was_lost_is_resumed_with_its_record_rebuilt(tmp_path: Path) -> None:
    """A damaged summary.json (a disk filled in the middle of a write): the resume goes on from the checkpoint and
    writes a whole record again, what the run is included."""
    run_dir = train(tmp_path, "run", *SMOKE)
    (run_dir / "summary.json").write_text('{"status": "comp')
    done = run_cnnlab(f"trainer.resume={run_dir}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = summary(run_dir)
    assert record["status"] == "completed" and record["epochs_completed"] == 3
    assert (record["model"], record["dataset"]) == ("lenet", "synthetic") and record["started_at"]
    assert metrics(run_dir)["epoch"].tolist() == [1, 2, 3]


def test_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, epoch=1, model={"w": torch.ones(3)})

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, epoch=2, model={"w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def _ctx(loss_fn) -> StepContext:
    return StepContext(pipeline=lambda x, train, generator: x.float() / 255, loss_fn=loss_fn,
                       device=torch.device("cpu"), bf16=False, channels_last=False, generator=None)


def test_first_nonfinite_step_is_found_without_stopping_the_loop() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    calls = []

    def loss_fn(logits, labels):  # a NaN injected at the 4th step
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) == 4 else loss

    batches = Batches(torch.randint(0, 255, (48, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (48,)), 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = run_steps(model, batches, _ctx(loss_fn), optimizer, scheduler,
                      EpochState.begin(batches, optimizer, torch.device("cpu")))
    assert state.step == 6 and int(state.first_nonfinite) == 3


def test_grad_clip_bounds_every_update() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = Batches(torch.randint(0, 255, (8, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (8,)), 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD at lr 1: the update is the gradient
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = lambda logits, labels: 1000 * torch.nn.functional.cross_entropy(logits, labels)  # noqa: E731
    run_steps(model, batches, _ctx(loss_fn), optimizer, scheduler,
              EpochState.begin(batches, optimizer, torch.device("cpu")), grad_clip=0.5)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_divergence_stops_the_run_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+debug=smoke", "scheduler=none", "optimizer.lr=1e6,0.05", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # diverged is a result, not a failure
    table = pd.read_csv(sweep / "sweep_summary.csv").set_index("optimizer.lr")
    assert table.loc[1e6, "status"] == "diverged" and table.loc[0.05, "status"] == "completed"
    diverged = summary(Path(table.loc[1e6, "path"]))
    assert diverged["diverged_epoch"] == 1 and 1 <= diverged["diverged_step"] <= 7  # 7 steps per smoke epoch
    assert any("trainer.grad_clip=1.0" in hint for hint in diverged["hints"])
    log = (Path(table.loc[1e6, "path"]) / "train.log").read_text()
    assert f"at step {diverged['diverged_step']} (epoch 1)" in log and "optimizer.lr=100000" in log


def test_deterministic_runs_repeat_bitwise(tmp_path: Path) -> None:
    runs = [train(tmp_path, f"run{i}", "+debug=smoke", "augmentation=cifar", "trainer.deterministic=true",
                  "trainer.seed=0") for i in range(2)]
    pd.testing.assert_frame_equal(metrics(runs[0]), metrics(runs[1]))
    assert_same_weights(*runs)
    assert summary(runs[0])["config"]["trainer"]["seed"] == 0


@pytest.mark.parametrize("make_target, message", [
    (lambda tmp, run: tmp / "nowhere", "does not exist"),
    (lambda tmp, run: tmp, "no checkpoints/last.pt in that directory"),
    (lambda tmp, run: _write(tmp / "junk.pt", b"not a checkpoint"), "is not a readable checkpoint"),
    (lambda tmp, run: _torch_save(tmp / "other.pt", {"weights": torch.ones(2)}), "is not a cnnlab checkpoint"),
])
def test_bad_resume_target_is_one_clear_message(tmp_path: Path, finished_run: Path, make_target, message: str) -> None:
    target = make_target(tmp_path, finished_run)
    done = run_cnnlab(f"trainer.resume={target}", "trainer.epochs=3", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr + done.stdout and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


@pytest.mark.parametrize("overrides, message", [
    (("model=vgg_tiny", "trainer.epochs=3"), "cannot resume with a different model"),
    (("optimizer.lr=0.5", "trainer.epochs=3"), "cannot resume with a different optimizer.lr (0.05 -> 0.5)"),
    (("trainer.epochs=2",), "has finished 2 epoch(s) and trainer.epochs=2: nothing to do"),
])
def test_incompatible_resume_is_refused_and_the_run_kept(tmp_path: Path, finished_run: Path, overrides, message) -> None:
    before = (finished_run / "summary.json").read_text(), (finished_run / "metrics.csv").read_text()
    done = run_cnnlab(f"trainer.resume={finished_run}", *overrides, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert ((finished_run / "summary.json").read_text(), (finished_run / "metrics.csv").read_text()) == before


def test_a_resume_may_find_the_data_elsewhere(tmp_path: Path, finished_run: Path) -> None:
    """dataset.root says where the data lies now (staged on another disk after a preemption); the run goes on."""
    done = run_cnnlab(f"trainer.resume={finished_run}", "trainer.epochs=3", "dataset.root=/staged/elsewhere", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary(finished_run)["config"]["dataset"]["root"] == "/staged/elsewhere"
    assert metrics(finished_run)["epoch"].tolist() == [1, 2, 3]


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    return train(tmp_path, "finished", "+debug=smoke")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _torch_save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_resume_in_a_multirun_is_refused(tmp_path: Path, finished_run: Path) -> None:
    done = run_cnnlab("-m", f"trainer.resume={finished_run}", "trainer.epochs=3,4", cwd=tmp_path)
    assert done.returncode == 2 and "drop -m" in done.stderr
