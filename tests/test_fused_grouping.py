"""The fused launcher's grouping rule (issue 17, in progress): what may differ inside a group."""
from __future__ import annotations

import pytest

from cnnlab.config import validate
from cnnlab.fused.grouping import fusion_key, plan_groups

from conftest import compose_config


def configs(*jobs: str) -> list[dict]:
    return [validate(compose_config("+debug=smoke", *job.split())).to_dict() for job in jobs]


def test_members_may_differ_in_hyperparameters_loss_dropout_activation_and_seed() -> None:
    jobs = configs("optimizer.lr=0.1", "optimizer.lr=0.01 optimizer.momentum=0.5", "optimizer.weight_decay=0",
                   "loss=mse", "loss.label_smoothing=0.1", "model.dropout=0.5", "trainer.seed=3",
                   "scheduler.pct_start=0.1", "trainer.progress=true viz.feature_maps=true name=other",
                   "model.activation=tanh")
    assert plan_groups(jobs, max_members=16) == [list(range(10))]


@pytest.mark.parametrize("apart", ["trainer.batch_size=64", "trainer.epochs=3", "model.batch_norm=true",
                                   "model=cifarnet", "model.kernel_size=3", "augmentation=flip", "optimizer=adam",
                                   "scheduler=none", "dataset.image_size=20", "trainer.precision=bf16"])
def test_what_shapes_the_step_keeps_jobs_apart(apart: str) -> None:
    base, other = configs("", apart)
    assert fusion_key(base) != fusion_key(other)
    assert plan_groups([base, other, base], max_members=16) == [[0, 2], [1]]


def test_groups_are_capped_and_keep_job_order() -> None:
    jobs = configs(*[f"trainer.seed={s}" for s in range(5)], "trainer.batch_size=16", "trainer.seed=9")
    assert plan_groups(jobs, max_members=2) == [[0, 1], [2, 3], [4, 6], [5]]
    with pytest.raises(ValueError):
        plan_groups(jobs, max_members=0)
