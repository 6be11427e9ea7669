"""cnnlab from Python: train(), sweep() and load_run() in this process, called again and again, with
run directories that pass the same contract checks as the CLI's."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import cnnlab
from cnnlab.checkpoint import load_checkpoint

from conftest import run_cnnlab
from test_run import check_run_dir

SMOKE = ["+debug=smoke", "trainer.epochs=1"]  # synthetic 3x16x16 images, 10 classes; 128 test images


class SimpleNN(nn.Module):
    """A notebook's class: defined where it is used (module test_api, or __main__ in a notebook)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_twice_in_one_process_with_an_instance_and_with_overrides(in_tmp: Path) -> None:
    argv, root_handlers = list(sys.argv), logging.getLogger().handlers[:]
    instance = SimpleNN(width=5)
    first = cnnlab.train(*SMOKE, model=instance)
    second = cnnlab.train(*SMOKE, "model=lenet", "optimizer.lr=0.02")
    assert sys.argv == argv and Path.cwd() == in_tmp  # nothing of the caller's changed
    assert logging.getLogger().handlers == root_handlers  # Hydra's job logging undone

    assert first.dir != second.dir and first.dir.parent == second.dir.parent == in_tmp / "outputs" / "runs"
    for run in (first, second):
        summary = check_run_dir(run.dir, epochs=1, test_size=128)
        assert run.status == "completed" and run.summary == summary
        assert run.metrics["epoch"].tolist() == [1]
        assert (run.dir / ".hydra" / "overrides.yaml").is_file()
    assert first.summary["model"] == "test_api.SimpleNN" and second.summary["model"] == "lenet"
    assert second.summary["config"]["optimizer"]["lr"] == 0.02
    # the instance was copied: its own weights are the run's initial ones, and it is left untrained
    assert first.summary["params_total"] == sum(p.numel() for p in instance.parameters())
    assert not torch.equal(load_checkpoint(first.dir / "checkpoints" / "last.pt")["model"]["body.0.weight"],
                           instance.body[0].weight)


def test_a_run_from_python_is_the_run_the_cli_makes(in_tmp: Path) -> None:
    api = cnnlab.train(*SMOKE, run_dir=in_tmp / "api_run")
    cli = run_cnnlab(*SMOKE, f"hydra.run.dir={in_tmp / 'cli_run'}", cwd=in_tmp)
    assert cli.returncode == 0, cli.stderr
    a, c = (check_run_dir(d, epochs=1, test_size=128) for d in (api.dir, in_tmp / "cli_run"))
    assert api.dir == in_tmp / "api_run"
    for key in ("test_acc", "test_loss", "best_val_acc", "params_total", "final_train_loss"):
        assert a[key] == c[key], key  # same seed, same config: the same numbers
    assert sorted(p.name for p in api.dir.iterdir()) == sorted(p.name for p in (in_tmp / "cli_run").iterdir())


def test_load_run_plots_and_gives_the_trained_model_back(in_tmp: Path) -> None:
    run = cnnlab.train(*SMOKE, model=SimpleNN)
    old = cnnlab.load_run(run.dir)
    assert old == run and old.summary == run.summary
    curves = old.plot()
    assert isinstance(curves, Figure) and len(curves.axes) == 2
    assert isinstance(old.confusion(), Figure)
    net = old.model(SimpleNN)  # the class, handed over again (as a notebook does after a restart)
    best = load_checkpoint(run.dir / "checkpoints" / "best.pt")["model"]
    assert isinstance(net, SimpleNN) and not net.training
    assert all(torch.equal(v.cpu(), best[k]) for k, v in net.state_dict().items())
    assert "status='completed'" in repr(old)
    with pytest.raises(cnnlab.ConfigError, match="no summary.json"):
        cnnlab.load_run(in_tmp)


def test_resume_from_python_with_the_notebooks_class(in_tmp: Path) -> None:
    run = cnnlab.train(*SMOKE, model=SimpleNN)
    again = cnnlab.train(f"trainer.resume={run.dir}", "trainer.epochs=2", model=SimpleNN)
    assert again.dir == run.dir
    check_run_dir(run.dir, epochs=2, test_size=128)


def test_sweep_returns_every_run_and_the_table(in_tmp: Path) -> None:
    sweep = cnnlab.sweep(*SMOKE, "optimizer.lr=0.05,0.01", model=SimpleNN, sweep_dir=in_tmp / "sweep")
    assert sweep.dir == in_tmp / "sweep"
    assert [r.dir.name for r in sweep.runs] == ["0_lr-0.05", "1_lr-0.01"]
    for run in sweep.runs:
        assert check_run_dir(run.dir, epochs=1, test_size=128)["model"] == "test_api.SimpleNN"
    table = sweep.table
    assert sorted(table["run"]) == ["0_lr-0.05", "1_lr-0.01"] and set(table["status"]) == {"completed"}
    assert sweep.best.dir.name == table["run"].iloc[0]
    second = cnnlab.sweep(*SMOKE, "model=lenet", "optimizer.lr=0.05,0.01")  # a default directory, not the first's
    assert second.dir != sweep.dir and len(second.runs) == 2


def test_a_sweep_with_a_failing_job_returns_it_failed(in_tmp: Path) -> None:
    sweep = cnnlab.sweep(*SMOKE, "optimizer.lr=0.05,1e30", "trainer.epochs=1", "model=lenet")
    assert len(sweep.runs) == 2 and sweep.runs[0].status == "completed"
    assert sweep.runs[1].status in ("diverged", "failed")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: cnnlab.train("model=nope"), "model=nope is not a model config; choose one of:"),
    (lambda: cnnlab.train("optimizer.lr=-1"), "optimizer.lr"),
    (lambda: cnnlab.train("-m", "optimizer.lr=0.1"), "use cnnlab.sweep() for a sweep"),
    (lambda: cnnlab.train(*SMOKE, model=42), "neither an nn.Module"),
    (lambda: cnnlab.train(*SMOKE, "model=vgg11", model=SimpleNN), "cannot choose another model too"),
    (lambda: cnnlab.sweep("optimizer.lr=0.1,0.01", "hydra/launcher=joblib", model=SimpleNN), "basic launcher"),
    (lambda: cnnlab.train(*SMOKE, "model=custom", "model._target_=nosuch.Net"), "no module named 'nosuch'"),
])
def test_bad_input_raises_config_error_with_the_clis_message(in_tmp: Path, call, message: str) -> None:
    with pytest.raises(cnnlab.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("summary.json"))


def test_a_directory_that_holds_a_run_is_refused_as_a_config_error(in_tmp: Path) -> None:
    run = cnnlab.train(*SMOKE)
    with pytest.raises(cnnlab.ConfigError, match="already holds a run"):
        cnnlab.train(*SMOKE, run_dir=run.dir)
    assert run.status == "completed"


def test_the_cli_message_and_the_api_message_are_the_same(in_tmp: Path) -> None:
    cli = run_cnnlab("model=nope", cwd=in_tmp)
    with pytest.raises(cnnlab.ConfigError) as err:
        cnnlab.train("model=nope")
    assert cli.returncode == 2 and cli.stderr.strip() == str(err.value)


def test_a_class_defined_in_main_needs_handing_over_in_a_new_process(in_tmp: Path) -> None:
    script = in_tmp / "notebook.py"
    script.write_text(
        "import cnnlab\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.f(x)\n"
        "run = cnnlab.train('+debug=smoke', 'trainer.epochs=1', run_dir='run', model=Net)\n"
        "print(run.status, run.summary['model'])\n")
    import subprocess

    done = subprocess.run([sys.executable, str(script)], cwd=in_tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0 and "completed __main__.Net" in done.stdout, done.stderr[-2000:]
    evaluated = run_cnnlab("evaluate", "run=run", cwd=in_tmp)
    assert evaluated.returncode == 2 and "defined in a notebook or script (__main__)" in evaluated.stderr
    assert "cnnlab.load_run(dir).model(Class)" in evaluated.stderr


def interrupt_at_step(monkeypatch, n: int):
    """Jupyter's "interrupt kernel" is SIGINT: sent from inside the nth training step. Returns what undoes it."""
    import signal

    import cnnlab.engine as engine

    inputs, steps = engine.StepContext.inputs, [0]

    def step(self, images, train):
        steps[0] += train
        if train and steps[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return inputs(self, images, train)

    monkeypatch.setattr(engine.StepContext, "inputs", step)
    return lambda: monkeypatch.setattr(engine.StepContext, "inputs", inputs)


def test_interrupting_the_kernel_checkpoints_and_the_named_call_goes_on(in_tmp: Path, monkeypatch) -> None:
    undo = interrupt_at_step(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt, match=r"checkpoint saved. Continue with cnnlab.train\(\"trainer.resume=") as err:
        cnnlab.train("+debug=smoke", "dataset.train_size=2000", run_dir=in_tmp / "run", model=SimpleNN)
    run = cnnlab.load_run(in_tmp / "run")
    assert run.status == "interrupted" and run.summary["interrupted_at"]["step"] == 10
    undo()
    resume = str(err.value).split('cnnlab.train("')[1].split('")')[0]
    again = cnnlab.train(resume, model=SimpleNN)
    assert again.dir == run.dir and again.status == "completed"
    check_run_dir(run.dir, epochs=2, test_size=128)


def test_interrupting_the_kernel_stops_a_sweep_before_its_next_job(in_tmp: Path, monkeypatch) -> None:
    """One Ctrl-C in job 0's training: job 0 is checkpointed, and jobs 1 and 2 do not start (Hydra's basic launcher
    would run them, as it catches a job's Exception); the same call goes on with all three."""
    undo = interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt, match=r"checkpoint saved. Continue with the same cnnlab.sweep\(...\) call"):
        cnnlab.sweep("+debug=smoke", "optimizer.lr=0.1,0.05,0.01", sweep_dir=in_tmp / "sweep")
    assert sorted(p.name for p in (in_tmp / "sweep").iterdir() if p.is_dir()) == ["0_lr-0.1"]
    assert cnnlab.load_run(in_tmp / "sweep" / "0_lr-0.1").status == "interrupted"
    undo()
    again = cnnlab.sweep("+debug=smoke", "optimizer.lr=0.1,0.05,0.01", sweep_dir=in_tmp / "sweep")
    assert [r.status for r in again.runs] == ["completed"] * 3
    assert (again.runs[0].dir / "metrics.csv").read_text().count("\n") == 3  # a header and epochs 1, 2: none twice
