"""hydra/sweeper=optuna: a search with pruning whose trials are ordinary runs in the sweep dir.

The study's own logic (asking, telling, resuming, refusing another search) runs here against a
launcher that writes each trial's summary.json; the real sweeps train LeNet on synthetic data and
read back the files the trials and the search wrote."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna  # the search extra, which `make test` installs
import pandas as pd
import pytest

from cnnlab.checks import ConfigError
from cnnlab.precheck import check_command_line, varying_keys
from cnnlab.search.settings import SearchSettings
from cnnlab.search.space import parse_space
from cnnlab.search.study import Search
from cnnlab.search.trial import open_study

from conftest import FRAGILE, run_cnnlab
from test_sweeps import WRAPPER


LR = "optimizer.lr=tag(log, interval(1e-3, 1))"
SEARCH = ("-m", "+debug=smoke", "trainer.epochs=4", "hydra/sweeper=optuna", "hydra.sweeper.pruner=asha", LR,
          "model.activation=choice(relu,tanh)")


# ------------------------------------------------------------------------------- the search space


def test_the_grammar_becomes_optuna_distributions() -> None:
    space = parse_space(["+debug=smoke", LR, "optimizer.momentum=interval(0.8, 0.99)",
                         "trainer.batch_size=int(interval(16, 64))", "model.width=range(16, 65, 16)",
                         "model.activation=relu,tanh", "loss=choice(cross_entropy,mse)"])
    assert space.fixed == ("+debug=smoke",)
    dists = {p.name: p.distribution() for p in space.params}
    assert dists["optimizer.lr"] == optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    assert dists["optimizer.momentum"] == optuna.distributions.FloatDistribution(0.8, 0.99)
    assert dists["trainer.batch_size"] == optuna.distributions.IntDistribution(16, 64)
    # range() searches exactly what the grid runs: the stop is excluded
    assert dists["model.width"] == optuna.distributions.IntDistribution(16, 64, step=16)
    assert space.params[3].grid() == [16, 32, 48, 64]
    assert dists["model.activation"] == optuna.distributions.CategoricalDistribution(["relu", "tanh"])
    assert dists["loss"] == optuna.distributions.CategoricalDistribution(["cross_entropy", "mse"])
    lr = space.params[0]
    assert lr.override(0.0123456789123) == "optimizer.lr=0.0123457"  # what the run records is what it trains with
    assert parse_space(["a=range(0.1, 0.5, 0.1)"]).params[0].grid() == [0.1, 0.2, 0.3, 0.4]


def test_the_check_jobs_hold_every_choice_and_both_ends() -> None:
    jobs = parse_space(["+debug=smoke", "optimizer.lr=interval(0.01, 0.1)", "model.activation=relu,tanh,gelu"]).check_jobs()
    assert jobs == [["+debug=smoke", "optimizer.lr=0.01", "model.activation=relu"],
                    ["+debug=smoke", "optimizer.lr=0.1", "model.activation=relu"],
                    ["+debug=smoke", "optimizer.lr=0.01", "model.activation=tanh"],
                    ["+debug=smoke", "optimizer.lr=0.01", "model.activation=gelu"]]


BAD = [
    ("optimizer.lr=interval(1e-4)", "missing a required argument"),
    ("optimizer.lr=tag(log, interval(0, 1))", "a log scale needs a low end above 0, got 0.0"),
    ("optimizer.lr=interval(1, 0.1)", "the low end (1.0) must be below the high end (0.1)"),
    ("optimizer.lr=tag(foo, interval(0.1, 1))", "the tag foo means nothing to the search"),
    ("optimizer.lr=tag(log, choice(0.1, 0.2))", "log applies to interval() and range()"),
    ("optimizer.lr=range(5, 1)", "holds no values to search"),
    ("optimizer.lr=tag(log, range(0.5, 3.0))", "a log scale takes no step"),
    ("model.activation=shuffle(relu, tanh)", "shuffle() means nothing to a search"),
    ("model.activation=choice(relu, nope)", "model.activation='nope' is not valid; choose one of: relu"),
    ("optimizer.lrr=interval(0.1, 1)", "optimizer.lrr is not a key of optimizer 'sgd'; valid keys: name, lr"),
    ("trainer.batch_size=interval(16, 64)", "int(interval(low, high)) integers"),
    ("trainer.epochs=3", "hydra/sweeper=optuna needs at least one key to search"),
    ("hydra.sweeper.sampler=grid optimizer.lr=interval(0.1, 1)", "sampler=grid walks listed values, but optimizer.lr"),
    ("hydra.sweeper.sampler=bayes optimizer.lr=interval(0.1, 1)", "choose one of: tpe, random, grid, cmaes"),
    ("hydra.sweeper.pruner=early optimizer.lr=interval(0.1, 1)", "choose one of: none, median, asha, hyperband"),
    ("hydra.sweeper.n_trials=0 optimizer.lr=interval(0.1, 1)", "hydra.sweeper.n_trials=0 is out of range"),
    ("hydra.sweeper.metric=test_acc optimizer.lr=interval(0.1, 1)", "choose one of: best_val_acc, final_val_acc"),
    ("hydra.sweeper.direction=minimize optimizer.lr=interval(0.1, 1)", "would search for the worst best_val_acc"),
    ("dataset.val_split=0 optimizer.lr=interval(0.1, 1)", "leaves the search nothing to score trials on"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0] for b in BAD])
def test_each_bad_search_is_one_clear_message(overrides: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_command_line(["-m", "+debug=smoke", "hydra/sweeper=optuna", *re.split(r" (?=[\w.+/]+=)", overrides)])
    assert message in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_a_bad_search_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    done = run_cnnlab("-m", "+debug=smoke", "hydra/sweeper=optuna", "optimizer.lr=tag(log, interval(0, 1))",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "'optimizer.lr=tag(log, interval(0, 1))': a log scale needs a low end above 0, got 0.0"
    assert not (tmp_path / "sweep").exists()


def test_a_missing_optuna_is_the_usual_one_line_message(monkeypatch) -> None:
    import cnnlab.search.settings as settings

    monkeypatch.setattr(settings, "importable", lambda module: module != "optuna")
    with pytest.raises(ConfigError, match=r"needs Optuna, which is not installed. Install it with `pip install "
                                          r"'cnnlab\[search\]'`"):
        check_command_line(["-m", "+debug=smoke", "hydra/sweeper=optuna", "optimizer.lr=interval(0.1, 1)"])


# ------------------------------------------------------------------------------- the study, with a launcher that writes results


class Trials:
    """A launcher stand-in: each trial's run dir gets the summary.json a run with that outcome writes."""

    def __init__(self, sweep: Path, failed: tuple[int, ...] = (), interrupted: tuple[int, ...] = ()) -> None:
        self.sweep, self.failed, self.interrupted = sweep, failed, interrupted
        self.launched: list[tuple[int, list[str]]] = []

    def __call__(self, overrides: list[list[str]], first: int) -> list[Path]:
        dirs = []
        for number, job in enumerate(overrides, start=first):
            self.launched.append((number, list(job)))
            values = dict(o.split("=", 1) for o in job)
            score = 1 - (math.log10(float(values.get("optimizer.lr", 0.01))) + 2) ** 2 / 10  # best at lr=0.01
            status = "failed" if number in self.failed else "interrupted" if number in self.interrupted else "completed"
            run = self.sweep / f"{number}_trial"
            run.mkdir(parents=True, exist_ok=True)
            (run / "summary.json").write_text(json.dumps(
                {"status": status, "overrides": list(job), "epochs_completed": 2, "best_val_acc": score}))
            dirs.append(run)
        return dirs


def search(sweep: Path, n_trials: int, sampler: str = "tpe", space: tuple[str, ...] = ("+debug=smoke", LR)) -> Search:
    settings = SearchSettings(n_trials=n_trials, sampler=sampler, pruner="none")
    return Search(settings, parse_space(list(space)), sweep, epochs=2)


@pytest.mark.parametrize("sampler, space", [
    ("tpe", ("+debug=smoke", LR, "model.activation=relu,tanh")),
    ("random", ("+debug=smoke", LR)),
    ("grid", ("+debug=smoke", "optimizer.lr=choice(0.1,0.01,0.001)", "trainer.seed=range(0, 3)")),
])
def test_samplers_are_seeded_and_a_continued_study_proposes_what_one_run_does(tmp_path: Path, sampler, space) -> None:
    whole = Trials(tmp_path / "whole")
    search(tmp_path / "whole", 8, sampler, space).run(whole, batch=2)
    again = Trials(tmp_path / "again")
    search(tmp_path / "again", 8, sampler, space).run(again, batch=2)
    assert again.launched == whole.launched and len(whole.launched) == 8
    assert len({tuple(job) for _, job in whole.launched}) == 8  # eight different trials (grid: no repeats)
    parts = Trials(tmp_path / "parts")
    search(tmp_path / "parts", 5, sampler, space).run(parts, batch=2)
    search(tmp_path / "parts", 8, sampler, space).run(parts, batch=2)  # the same command, more trials
    assert parts.launched == whole.launched


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    trials = Trials(tmp_path, failed=(1, 2))
    search(tmp_path, 5).run(trials, batch=1)
    study = open_study(SearchSettings(), tmp_path, 2)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs["status"] == "failed"
    assert study.best_trial.value == max(t.value for t in study.trials if t.state.name == "COMPLETE")


def test_an_interrupted_trial_is_resumed_with_its_own_values(tmp_path: Path) -> None:
    stopped = Trials(tmp_path, interrupted=(2,))
    search(tmp_path, 5).run(stopped, batch=1)
    assert [n for n, _ in stopped.launched] == [0, 1, 2]  # the sweep stops asking at the interrupted trial
    again = Trials(tmp_path)
    search(tmp_path, 5).run(again, batch=1)
    assert again.launched[0] == stopped.launched[2]  # trial 2 again: same job number, same overrides
    assert [n for n, _ in again.launched] == [2, 3, 4]
    study = open_study(SearchSettings(), tmp_path, 2)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5


def test_a_trial_that_ended_while_the_sweeper_was_gone_is_told_not_rerun(tmp_path: Path) -> None:
    s = search(tmp_path, 3)
    study = open_study(s.settings, tmp_path, 2, create=True)
    s._check_signature(study)
    trial = study.ask({p.name: p.distribution() for p in s.space.params})
    run = tmp_path / "0_trial"
    Trials(tmp_path)([s.space.trial_overrides(trial.params)], 0)
    trial.set_user_attr("run_dir", str(run))
    later = Trials(tmp_path)
    s.run(later, batch=1)
    assert [n for n, _ in later.launched] == [1, 2]
    assert open_study(s.settings, tmp_path, 2).trials[0].state.name == "COMPLETE"


def test_a_study_refuses_a_different_search_in_its_directory(tmp_path: Path) -> None:
    opened: list[bool] = []
    search(tmp_path, 2, space=("+debug=smoke", "trainer.epochs=2", LR)).run(Trials(tmp_path), 1, lambda: opened.append(True))
    assert opened == [True]
    with pytest.raises(ConfigError, match=r"search was \[optimizer.lr:float:0.001:1.0:None:True:\], now "
                                          r"\[optimizer.lr:float:0.01:0.1:None:False:\]"):
        search(tmp_path, 3, space=("+debug=smoke", "trainer.epochs=2", "optimizer.lr=interval(0.01, 0.1)")).run(
            Trials(tmp_path), 1, lambda: opened.append(True))
    with pytest.raises(ConfigError, match=r"fixed was \[\+debug=smoke, trainer.epochs=2\], now"):
        search(tmp_path, 3, space=("+debug=smoke", "trainer.epochs=3", LR)).run(Trials(tmp_path), batch=1)
    other = Search(SearchSettings(n_trials=3, sampler="random", pruner="none"),
                   parse_space(["+debug=smoke", "trainer.epochs=2", LR]), tmp_path, epochs=2)
    with pytest.raises(ConfigError, match="'sampler': 'tpe'"):
        other.run(Trials(tmp_path), batch=1)
    assert opened == [True]  # a refused re-run touches nothing (the sweeper writes multirun.yaml in `opened`)
    more = Trials(tmp_path)  # the same search, its fixed overrides in another order, a device of its own
    search(tmp_path, 3, space=("trainer.device=cpu", "trainer.epochs=2", LR, "+debug=smoke")).run(more, batch=1)
    assert [n for n, _ in more.launched] == [2]


def test_different_seeds_propose_different_trials(tmp_path: Path) -> None:
    proposed = []
    for seed in (0, 1):
        trials = Trials(tmp_path / str(seed))
        Search(SearchSettings(n_trials=4, seed=seed, pruner="none"), parse_space([LR]), tmp_path / str(seed), 2).run(
            trials, batch=1)
        proposed.append({job[-1] for _, job in trials.launched})
    assert not proposed[0] & proposed[1]


def test_a_trial_the_launcher_loses_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    trials = Trials(tmp_path)

    def launch(overrides: list[list[str]], first: int) -> list[Path]:
        if first == 1:  # a joblib worker killed, a SLURM array job timed out: the launcher raises
            raise RuntimeError("A worker process managed by the executor was unexpectedly terminated")
        return trials(overrides, first)

    search(tmp_path, 4).run(launch, batch=1)
    study = open_study(SearchSettings(), tmp_path, 2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_the_command_line_fixes_a_key_a_preset_searches() -> None:
    space = parse_space(["optimizer.lr=tag(log, interval(1e-4, 1))", "model.activation=choice(relu,tanh)",
                         "+debug=smoke", "optimizer.lr=0.05"])  # the preset's params first, then the command line
    assert [p.name for p in space.params] == ["model.activation"] and space.fixed == ("+debug=smoke", "optimizer.lr=0.05")
    again = parse_space(["optimizer.lr=0.05", "optimizer.lr=interval(0.01, 0.1)"])
    assert [p.name for p in again.params] == ["optimizer.lr"] and again.fixed == ()


# ------------------------------------------------------------------------------- real searches


def files(job: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(job)): (p.read_bytes(), p.stat().st_mtime_ns) for p in job.rglob("*") if p.is_file()}


def test_a_search_prunes_reports_its_best_and_continues(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cnnlab(*SEARCH, "hydra.sweeper.n_trials=8", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    assert [int(p.name.split("_")[0]) for p in jobs] == list(range(8))
    summaries = {p: json.loads((p / "summary.json").read_text()) for p in jobs}
    pruned = [p for p, s in summaries.items() if s["status"] == "pruned"]
    assert pruned and all(s["status"] in ("completed", "pruned") for s in summaries.values())
    for run in pruned:  # stopped early, with its epoch, its files and a test score
        s = summaries[run]
        assert 1 <= s["stopped_at_epoch"] == s["epochs_completed"] < 4
        assert len(pd.read_csv(run / "metrics.csv")) == s["stopped_at_epoch"]
        assert (run / "checkpoints" / "last.pt").is_file() and 0 <= s["test_acc"] <= 1
        assert (run / "confusion_matrix.csv").is_file() and (run / "curves.png").is_file()

    table = pd.read_csv(sweep / "sweep_summary.csv")  # the usual report: every trial, statuses and parameters
    assert len(table) == 8 and set(table["status"]) == {"completed", "pruned"}
    assert {"optimizer.lr", "model.activation"} <= set(table.columns)
    trials = list(csv.DictReader(open(sweep / "search_trials.csv")))
    assert [t["state"] for t in trials] == ["pruned" if summaries[jobs[i]]["status"] == "pruned" else "complete"
                                            for i in range(8)]
    complete = sum(t["state"] == "complete" for t in trials)
    assert complete >= 2
    for name in ("search_history.png", "search_parallel.png", "search_slice.png"):
        assert (sweep / name).stat().st_size > 10_000, name
    md = (sweep / "search_summary.md").read_text()
    if complete >= 3:  # importances say nothing with fewer: a note says so instead
        assert (sweep / "search_importances.png").stat().st_size > 10_000
        assert "## Parameter importances" in md and "| optimizer.lr |" in md
    else:
        assert f"parameter importances need 3 completed trials; this search has {complete}" in done.stdout

    completed = {p: s for p, s in summaries.items() if s["status"] == "completed"}
    best = max(completed, key=lambda p: completed[p]["best_val_acc"])
    number = int(best.name.split("_")[0])
    assert f"best trial {number}: best_val_acc {completed[best]['best_val_acc']:.4f}" in done.stdout
    command = [line for line in done.stdout.splitlines() if line.startswith("reproduce it: ")][-1]
    args = shlex.split(command.removeprefix("reproduce it: "))
    assert args[:3] == ["python", "-m", "cnnlab"] and args[3:] == completed[best]["overrides"]
    again = run_cnnlab(*args[3:], f"hydra.run.dir={tmp_path / 'best'}", cwd=tmp_path)  # the command reproduces it
    assert again.returncode == 0, again.stderr[-2000:]
    assert pd.read_csv(tmp_path / "best" / "metrics.csv")["val_acc"].tolist() == pd.read_csv(best / "metrics.csv")["val_acc"].tolist()

    before = {p.name: files(p) for p in jobs}
    more = run_cnnlab(*SEARCH, "hydra.sweeper.n_trials=10", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert {p.name: files(p) for p in jobs} == before  # finished trials are kept, not one byte touched
    assert len(list(csv.DictReader(open(sweep / "search_trials.csv")))) == 10
    assert sorted(int(p.name.split("_")[0]) for p in sweep.iterdir() if p.is_dir()) == list(range(10))


def test_pruning_reaches_trials_in_joblib_workers(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=3", "hydra/sweeper=optuna", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", "hydra.sweeper.sampler=grid", "hydra.sweeper.pruner=asha",
                      "optimizer.lr=choice(0.2,1e-7)", "trainer.seed=range(0, 3)", "hydra.sweeper.n_trials=6",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 6 and len({s["pid"] for s in summaries}) >= 2  # trials ran in joblib's workers
    pruned = [s for s in summaries if s["status"] == "pruned"]  # the workers' reports reached the study, and back
    assert pruned and all(s["stopped_at_epoch"] == s["epochs_completed"] < 3 for s in pruned)
    trials = list(csv.DictReader(open(sweep / "search_trials.csv")))
    assert sorted(t["state"] for t in trials) == sorted("pruned" if s["status"] == "pruned" else "complete"
                                                        for s in summaries)




def test_a_trial_that_raises_does_not_end_the_study(tmp_path: Path) -> None:
    (tmp_path / "fragile.py").write_text(FRAGILE)
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+debug=smoke", "trainer.epochs=1", "model=custom", "model._target_=fragile.Fragile",
                      "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "+model.fragile=choice(0,1)",
                      "trainer.seed=range(0, 2)", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # as any sweep with failed jobs
    assert "2 of 4 jobs failed" in done.stderr
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert len(summaries) == 4
    for s in summaries.values():
        broke = "+model.fragile=1" in s["overrides"]
        assert s["status"] == ("failed" if broke else "completed")
        assert ("the fragile model broke" in s["error"]) if broke else s["test_acc"] >= 0
    trials = list(csv.DictReader(open(sweep / "search_trials.csv")))
    assert sorted(t["state"] for t in trials) == ["complete", "complete", "fail", "fail"]


def test_a_search_stopped_by_sigterm_resumes_its_trial(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = ("-m", "+debug=smoke", "hydra/sweeper=optuna", "hydra.sweeper.pruner=none", LR,
               "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    # test_sweeps' wrapper: its Nth training step, counted over the trials, sends SIGTERM
    env = {**os.environ, "STEP": str(14 + 10), "DO": "SIGTERM", "PYTHONUNBUFFERED": "1"}  # trial 1, epoch 2 (trial 0: 14 steps)
    stopped = subprocess.run([sys.executable, "-c", WRAPPER, "-", *command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    (trial1,) = sweep.glob("1_*")
    assert json.loads((trial1 / "summary.json").read_text())["status"] == "interrupted"
    assert not list(sweep.glob("2_*"))  # no trial is asked for while one is stopped
    again = run_cnnlab(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    s = json.loads((trial1 / "summary.json").read_text())
    assert s["status"] == "completed" and len(s["resumes"]) == 1  # resumed from its checkpoint, not redone
    assert pd.read_csv(trial1 / "metrics.csv")["epoch"].tolist() == [1, 2]
    trials = list(csv.DictReader(open(sweep / "search_trials.csv")))
    assert [t["state"] for t in trials] == ["complete"] * 3


def test_the_lr_search_preset_searches_resnet20_with_asha_and_runs(tmp_path: Path) -> None:
    from test_data import write_cifar10

    from cnnlab.precheck import compose_job

    cfg = compose_job(["+experiment=lr_search"])
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.epochs) == ("resnet20", "cifar10", 15)
    jobs = check_command_line(["-m", "+experiment=lr_search"])  # every extreme of the space validates
    assert varying_keys(jobs) == ["optimizer.lr", "optimizer.weight_decay", "loss.label_smoothing"]
    assert "`lr_search`" in (Path(__file__).resolve().parent.parent / "README.md").read_text()

    root, sweep = tmp_path / "data", tmp_path / "sweep"
    write_cifar10(root)
    done = run_cnnlab("-m", "+experiment=lr_search", f"dataset.root={root}", "dataset.download=false",
                      "dataset.subset=48", "dataset.val_split=8", "trainer.epochs=2", "trainer.batch_size=16",
                      "trainer.device=cpu", "trainer.checkpoints=none", "hydra.sweeper.n_trials=3",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = list(csv.DictReader(open(sweep / "search_trials.csv")))
    assert len(trials) == 3 and {"param optimizer.lr", "param optimizer.weight_decay",
                                 "param loss.label_smoothing"} <= set(trials[0])
    summary = json.loads(next(sweep.glob("0_*/summary.json")).read_text())
    assert summary["config"]["model"]["name"] == "resnet20" and summary["config"]["optimizer"]["lr"] > 0.01 - 1e-9


def test_trials_in_submitit_processes_report_every_epoch_to_one_study(tmp_path: Path) -> None:
    """submitit_local runs the SLURM launcher's code path here: each trial pickled into its own process."""
    sweep = tmp_path / "sweep"
    done = run_cnnlab("-m", "+debug=smoke", "hydra/sweeper=optuna", "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=5", LR, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = open_study(SearchSettings(), sweep, 2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:  # what each trial's process reported, epoch by epoch, is its metrics.csv
        metrics = pd.read_csv(Path(trial.user_attrs["run_dir"]) / "metrics.csv")
        assert trial.intermediate_values == dict(zip(metrics["epoch"], metrics["val_acc"].cummax()))
    assert len({json.loads(p.read_text())["pid"] for p in sweep.glob("*/summary.json")}) == 2
