"""Every job of a command line is composed and checked before anything runs: mistakes Hydra catches get
cnnlab's one paragraph and exit 2, and a sweep with one bad job starts none."""
from __future__ import annotations

from pathlib import Path

import pytest

from cnnlab.checks import ConfigError
from cnnlab.precheck import check_command_line

from conftest import run_cnnlab


@pytest.mark.parametrize("override, expected", [
    ("model=lenett", "model=lenett is not a model config; choose one of: alexnet, alexnet_original, cifarnet"),
    ("optimizer.lrr=0.1", "optimizer.lrr is not a key of optimizer 'sgd'; valid keys: name, lr, momentum"),
    ("optimizer.lr=[0.1", "'optimizer.lr=[0.1' is not a valid override of optimizer.lr"),
    ("+debug=smok", "debug=smok is not a debug config; choose one of: smoke"),
    ("hydra/launcher=jobliby", "hydra/launcher=jobliby is not a hydra/launcher config; choose one of: basic, fused, joblib"),
])
def test_what_hydra_catches_is_one_paragraph_and_exit_2(tmp_path: Path, override: str, expected: str) -> None:
    done = run_cnnlab(override, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and not (tmp_path / "outputs").exists()


def test_a_sweep_with_a_bad_seventh_job_starts_none(tmp_path: Path) -> None:
    lrs = ["0.1", "0.09", "0.08", "0.07", "0.06", "0.05", "-1", "0.03", "0.02", "0.01", "0.005", "0.001"]
    done = run_cnnlab("-m", "+debug=smoke", f"optimizer.lr={','.join(lrs)}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      cwd=tmp_path)
    assert done.returncode == 2
    assert ("1 of the 12 jobs of this sweep has a config error, so none was started: job 6 "
            "(+debug=smoke optimizer.lr=-1): optimizer.lr=-1.0 is out of range") in done.stderr
    assert not (tmp_path / "sweep").exists()  # not one job ran


def test_jobs_failing_for_one_cause_are_told_it_once(tmp_path: Path) -> None:
    done = run_cnnlab("-m", "+debug=smoke", "optimizer.lr=0.1,0.05,0.01", "trainer.epochs=2.5",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "sweep").exists()
    said = " ".join(done.stderr.split())
    assert said.startswith("all of the 3 jobs of this sweep have this config error, so none was started: trainer.epochs: "
                           "Value '2.5' of type 'float' could not be converted to Integer; trainer.epochs takes a value "
                           "of type int")  # a key that exists: its type, not the list of keys
    assert said.count("could not be converted") == 1 and "Valid keys" not in said
    some = run_cnnlab("-m", "+debug=smoke", "model=lenet,alexnet_original", "model.dropout=0,0.5",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert some.returncode == 2 and " ".join(some.stderr.split()).startswith(
        "2 (jobs 2, 3) of the 4 jobs of this sweep have this config error, so none was started: input size 16x16 is too "
        "small for alexnet_original")


def test_a_job_whose_model_does_not_fit_the_data_is_found_before_the_sweep(tmp_path: Path) -> None:
    done = run_cnnlab("-m", "+debug=smoke", "model=lenet,alexnet_original", f"hydra.sweep.dir={tmp_path / 's'}",
                      cwd=tmp_path)
    assert done.returncode == 2 and "job 1 (+debug=smoke model=alexnet_original): input size 16x16 is too small" \
        in done.stderr
    assert not (tmp_path / "s").exists()


def test_a_report_facet_typo_is_found_before_the_sweep(tmp_path: Path) -> None:
    done = run_cnnlab("-m", "+debug=smoke", "model.activation=relu,tanh", "report.facet=[activaton]",
                      f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "activaton does not vary in this sweep; facet by one of the keys that vary: model.activation" in done.stderr
    assert not (tmp_path / "s").exists()


def test_preset_sweeps_expand_as_hydra_expands_them() -> None:
    checked = []
    jobs = check_command_line(["-m", "+experiment=dropout_study"], checked.append)
    assert len(jobs) == len(checked) == 12  # 3 models x 2 dropout rates x 2 datasets
    assert {tuple(sorted(o for o in job if o.startswith("model="))) for job in jobs} == {
        ("model=alexnet",), ("model=vgg11",), ("model=resnet18",)}
    assert check_command_line(["--cfg", "job"]) == []  # Hydra's own flags: Hydra's business
    with pytest.raises(ConfigError, match="optimizer.lr=-1.0 is out of range"):
        check_command_line(["optimizer.lr=-1"])
