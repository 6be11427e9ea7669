"""The stuck-training doctor on real models and real Fashion-MNIST (CPU): it catches the VGG-11 that
sits at loss ln(10) with every image in one class, stays quiet on a healthy LeNet, measures dead
ReLUs and vanishing gradients on constructed cases, advises only overrides that change the config,
and leaves no trace on the run it examines."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab import doctor
from cnnlab.config import RunConfig, validate
from cnnlab.data import DataBundle, load_dataset
from cnnlab.losses import build_loss
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.build import doctor_settings, prepare
from cnnlab.data.batches import Batches
from cnnlab.engine import Evaluation, StepContext, evaluate, train_one_epoch

from conftest import FASHION_MNIST_SYSTEM_DIR, compose_config, run_cnnlab

DATA = (f"dataset.root={FASHION_MNIST_SYSTEM_DIR}", "dataset.download=false", "trainer.device=cpu")
BROKEN_VGG = ("model=vgg11", "model.batch_norm=false", "model.init=pytorch_default", "optimizer.lr=0.1",
              "scheduler=none")
LN10 = math.log(10)


@dataclass
class Trained:
    run: RunConfig
    model: nn.Module
    ctx: StepContext
    data: DataBundle
    train_loss: float
    evaluation: Evaluation | None

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch_size training images, as the trainer hands them to the doctor."""
        n = self.run.trainer.batch_size
        return self.data.train.images[:n], self.data.train.labels[:n]

    def examine(self, epoch: int = 1, evaluation: Evaluation | None | str = "own",
                train_loss: float | None = None) -> doctor.Diagnosis | None:
        images, labels = self.batch()
        return doctor.examine(self.model, images, labels, self.ctx, doctor_settings(self.run, 10), epoch,
                              self.train_loss if train_loss is None else train_loss,
                              self.evaluation if evaluation == "own" else evaluation)


def setup(*overrides: str, epochs: int = 1) -> Trained:
    """Validate a composed config, build the model, load the data; train `epochs` epochs as fit does."""
    run = validate(compose_config(*DATA, *overrides))
    prep = prepare(run)  # seeds the weights
    data = load_dataset(run.dataset, seed=run.trainer.seed)
    device = prep.device
    generator = torch.Generator(device=device).manual_seed(run.trainer.seed)
    ctx = StepContext(prep.pipeline, build_loss(run.loss, prep.spec.num_classes), device, False, False, generator)
    model = prep.model.to(device)
    train_loss, evaluation = math.nan, None
    if epochs:
        batches = Batches(data.train.images, data.train.labels, run.trainer.batch_size, shuffle=True,
                          drop_last=True, generator=generator)
        optimizer = build_optimizer(run.optimizer, model.parameters())
        scheduler = build_scheduler(run.scheduler, optimizer, len(batches), run.trainer.epochs)
        for _ in range(epochs):
            train_loss, _, _ = train_one_epoch(model, batches, ctx, optimizer, scheduler)
        if data.val is not None:
            evaluation = evaluate(model, data.val, ctx, run.trainer.eval_batch_size, prep.spec.num_classes)
    return Trained(run, model, ctx, data, train_loss, evaluation)


def fix_keys(diagnosis: doctor.Diagnosis) -> dict[str, str]:
    """{"model.batch_norm": "true", ...} from the "key=value: why" fixes."""
    pairs = [fix.split(":", 1)[0].split("=", 1) for fix in diagnosis.fixes]
    return {k: v for k, v in pairs}


# ------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def broken_vgg() -> Trained:
    return setup(*BROKEN_VGG, "dataset.subset=512")


def test_broken_vgg11_is_diagnosed_stuck_with_fixes_for_its_config(broken_vgg):
    t = broken_vgg
    assert t.evaluation is not None
    d = t.examine()
    assert d is not None and d.stuck and d.epoch == 1
    collapsed = d.finding("collapsed")
    assert collapsed is not None, d.text()
    ev = collapsed.evidence
    assert ev["loss"] == pytest.approx(t.evaluation.loss)
    assert ev["ln_num_classes"] == pytest.approx(LN10) and ev["chance_loss"] == pytest.approx(LN10)
    assert abs(ev["loss"] - LN10) < doctor.COLLAPSE_LOSS_REL_TOL * LN10
    predicted = t.evaluation.confusion.sum(axis=0)
    top2 = np.sort(predicted)[::-1][:2].sum() / predicted.sum()
    assert ev["top2_share"] == pytest.approx(top2) and ev["top2_share"] >= doctor.COLLAPSE_TOP_SHARE
    assert ev["top_classes"][0] == int(predicted.argmax()) and ev["source"] == "validation"

    fixes = fix_keys(d)
    assert fixes["model.batch_norm"] == "true"
    assert fixes["model.init"] == "kaiming"
    assert fixes["optimizer.lr"] == "0.01"
    assert fixes["scheduler.warmup_epochs"] == "1"
    assert all(": " in fix and len(fix.split(": ", 1)[1]) > 10 for fix in d.fixes), d.fixes  # each says why
    assert "batch norm" in d.cause and "0.1" in d.cause and "momentum 0.9" in d.cause

    # Every fix is a valid override that changes this config.
    fixed = validate(compose_config(*DATA, *BROKEN_VGG, "dataset.subset=512", *(f"{k}={v}" for k, v in fixes.items())))
    assert fixed.model.batch_norm is True and fixed.model.init == "kaiming"
    assert fixed.optimizer.lr == pytest.approx(0.01) and fixed.scheduler.warmup_epochs == 1

    summary = json.loads(json.dumps(d.to_dict()))  # summary.json needs no default= for it
    assert summary["stuck"] is True and summary["epoch"] == 1 and summary["fixes"] == d.fixes
    assert "collapsed" in [f["code"] for f in summary["findings"]]
    text = d.text()
    assert text.startswith("doctor:") and "model.batch_norm=true" in text and f"{ev['loss']:.4f}" in text


def test_without_validation_the_batch_and_train_loss_show_the_collapse(broken_vgg):
    t = broken_vgg
    d = t.examine(evaluation=None)
    assert d is not None and d.stuck
    ev = d.finding("collapsed").evidence
    assert ev["source"] == "training" and ev["loss"] == pytest.approx(t.train_loss)
    assert ev["predictions"] == t.run.trainer.batch_size and ev["top2_share"] >= doctor.COLLAPSE_TOP_SHARE


def test_healthy_lenet_default_config_is_quiet():
    t = setup("dataset.subset=2000")  # the default config: LeNet, SGD, one-cycle over 10 epochs
    assert t.evaluation.loss < 0.95 * LN10 or t.evaluation.acc > 0.2
    assert t.examine() is None
    assert t.examine(evaluation=None) is None  # and on the batch alone


def test_healthy_lenet_without_val_split_is_quiet():
    t = setup("dataset.subset=2000", "dataset.val_split=0", "trainer.epochs=1")
    assert t.evaluation is None
    assert t.examine(evaluation=None) is None


# ------------------------------------------------------------------------------ no trace


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _assert_same(before, after) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("with_grads", [False, True])
def test_examine_leaves_no_trace(with_grads):
    # BatchNorm (running stats, num_batches_tracked) and dropout (draws from the torch RNG) both present.
    t = setup("model.batch_norm=true", "model.dropout=0.5", "dataset.subset=256", epochs=0)
    model, images, labels = t.model, *t.batch()
    model.train()
    if with_grads:  # as after an optimizer step in the epoch: the grads of the last batch are still there
        t.ctx.loss_fn(model(t.ctx.inputs(images, train=False)), labels).backward()
    model.classifier[3].eval()  # a submodule in another mode than its parent keeps it
    bn = model.features[1]
    seen: list[tuple[bool, int]] = []
    bn.register_forward_hook(lambda m, i, o: seen.append((m.training, int(m.num_batches_tracked))))

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, grads = _state(model), _grads(model)
    modes = {n: m.training for n, m in model.named_modules()}
    rng, data_rng = torch.get_rng_state(), t.ctx.generator.get_state()
    tracked = int(bn.num_batches_tracked)

    doctor.examine(model, images, labels, t.ctx, doctor_settings(t.run, 10), 1, LN10, None)

    # It did run a train-mode pass that moved the BN statistics (then put them back).
    assert (True, tracked + 1) in seen
    _assert_same(params, {n: p.detach() for n, p in model.named_parameters()})
    _assert_same(state, model.state_dict())
    after = _grads(model)
    assert [g is None for g in after] == [g is None for g in grads] == [not with_grads] * len(grads)
    assert all(a is None or torch.equal(a, b) for a, b in zip(after, grads))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng), "dropout draws shifted the global torch RNG"
    assert torch.equal(t.ctx.generator.get_state(), data_rng)

    # And in eval mode it stays in eval mode.
    model.eval()
    doctor.examine(model, images, labels, t.ctx, doctor_settings(t.run, 10), 1, LN10, None)
    assert not any(m.training for m in model.modules())
    _assert_same(state, model.state_dict())


# ------------------------------------------------------------------------------ constructed cases


def _dead_lenet(inplace: bool) -> Trained:
    """LeNet whose first conv has 4 of its 6 channels biased to -100 and whose first hidden FC layer
    is biased to -100: those 4 channels and all 120 FC units (and the 84 after them, which then see
    only zeros and have zero bias) output zero for every image."""
    t = setup("dataset.subset=256", epochs=0)
    m = t.model
    with torch.no_grad():
        m.features[0].bias[:4] = -100.0
        m.classifier[1].bias.fill_(-100.0)
    if inplace:
        for seq in (m.features, m.classifier):
            for i, layer in enumerate(seq):
                if isinstance(layer, nn.ReLU):
                    seq[i] = nn.ReLU(inplace=True)
    return t


@pytest.mark.parametrize("inplace", [False, True])
def test_dead_relus_are_measured(inplace):
    t = _dead_lenet(inplace)
    images, labels = t.batch()
    # The expected counts, measured independently on the ReLU inputs.
    m = t.model.eval()
    with torch.no_grad():
        x = t.ctx.inputs(images, train=False)
        conv2_in = m.features[:4](x)
        pre = {"features.2": m.features[:2](x), "features.6": m.features[4:6](conv2_in)}
        flat = m.features(x).flatten(1)
        pre["classifier.3"] = m.classifier[1:3](flat)
        pre["classifier.7"] = m.classifier[5:7](m.classifier[3:5](pre["classifier.3"]).clamp(min=0))
    expected = {k: [int((v.transpose(0, 1).flatten(1) <= 0).all(1).sum()), v.shape[1]] for k, v in pre.items()}
    assert expected["features.2"] == [4, 6] and expected["classifier.3"] == [120, 120]
    assert expected["classifier.7"] == [84, 84]

    d = t.examine(epoch=3, evaluation=None, train_loss=1.0)  # train_loss far from ln(10): no collapse
    assert d is not None and not d.stuck
    ev = d.finding("dead_relus").evidence
    assert ev["per_layer"] == expected
    assert ev["units"] == 6 + 16 + 120 + 84
    assert ev["dead_units"] == sum(d for d, _ in expected.values())
    assert ev["dead_fraction"] == pytest.approx(ev["dead_units"] / ev["units"]) and ev["dead_fraction"] > 0.5
    # the earliest of the fully dead layers is where the dying starts
    assert ev["worst_layer"] == "classifier.3" and ev["worst_layer_dead_fraction"] == 1.0
    assert ev["worst_layer_units"] == 120
    fixes = fix_keys(d)
    assert fixes["model.activation"] == "leaky_relu"
    assert fixes["optimizer.lr"] == "0.005"  # the default 0.05, an order of magnitude lower
    assert fixes["model.batch_norm"] == "true"  # LeNet's default is without BN
    assert "model.init" not in fixes  # already kaiming
    if hasattr(t.run.trainer, "grad_clip") and not t.run.trainer.grad_clip:
        assert fixes["trainer.grad_clip"] == "1.0"
    assert "ReLU" in d.text() and d.text().startswith("doctor:")


def test_healthy_relus_are_not_flagged():
    t = setup("dataset.subset=256", epochs=0)
    assert t.examine(evaluation=None, train_loss=1.0) is None


def test_vanishing_gradients_in_a_sigmoid_vgg_without_bn():
    t = setup("model=vgg11", "model.activation=sigmoid", "model.batch_norm=false", "dataset.subset=256", epochs=0)
    images, labels = t.batch()
    # Independent measurement of the first and last weighted layers' relative gradient norms.
    ref = copy.deepcopy(t.model).train()
    torch.manual_seed(1)
    t.ctx.loss_fn(ref(t.ctx.inputs(images, train=False)), labels).backward()
    first, last = ref.features[0][0], ref.classifier[7]
    r_first = (first.weight.grad.norm() / first.weight.norm()).item()
    r_last = (last.weight.grad.norm() / last.weight.norm()).item()

    d = t.examine(epoch=1, evaluation=None, train_loss=1.0)
    assert d is not None
    ev = d.finding("vanishing_gradients").evidence
    assert ev["first_layer"] == "features.0.0" and ev["last_layer"] == "classifier.7"
    assert ev["first_weight_norm"] == pytest.approx(first.weight.norm().item(), rel=1e-6)
    # dropout in the classifier differs between the two passes; the scale is what matters
    assert ev["first_relative"] == pytest.approx(r_first, rel=0.5)
    assert ev["last_relative"] == pytest.approx(r_last, rel=0.5)
    assert ev["first_relative"] < doctor.VANISH_ABS and ev["first_to_last"] < doctor.VANISH_REL
    assert ev["first_to_last"] == pytest.approx(ev["first_relative"] / ev["last_relative"])
    assert "dead_relus" not in d.codes  # sigmoid: no rectifier to measure
    fixes = fix_keys(d)
    assert fixes["model.activation"] == "relu" and fixes["model.batch_norm"] == "true"
    assert "model.init" not in fixes  # already kaiming (Glorot for sigmoid)
    assert "optimizer.lr" not in fixes  # a lower lr does not bring a vanished gradient back


def test_scaled_down_weights_vanish_and_healthy_gradients_do_not():
    t = setup("dataset.subset=256", epochs=0)
    assert t.examine(evaluation=None, train_loss=1.0) is None
    # Shrinking the three middle layers' weights by 100x each (biases are 0) shrinks the signal that
    # reaches the head and the gradient that reaches conv1 by 10^6: the head's relative gradient
    # shrinks with its input too, so it is the absolute criterion that catches it.
    with torch.no_grad():
        for layer in (t.model.features[4], t.model.classifier[1], t.model.classifier[5]):
            layer.weight.mul_(0.01)
    d = t.examine(evaluation=None, train_loss=1.0)
    assert d is not None and d.codes == ["vanishing_gradients"], d.text()
    ev = d.finding("vanishing_gradients").evidence
    assert ev["first_layer"] == "features.0" and ev["last_layer"] == "classifier.9"
    assert ev["first_relative"] < doctor.VANISH_ABS and ev["criterion"] == "absolute"


# ------------------------------------------------------------------------------ advice fits the config


def _collapse(t: Trained) -> None:
    """Make the model give every image the same near-uniform output favouring class 3."""
    head = t.model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[3] = 0.01


def test_fixes_never_repeat_what_the_config_already_has():
    # BN on, Kaiming init, relu, one-cycle (its ramp is the warm-up): only the lr is left to change.
    t = setup("model.batch_norm=true", "dataset.subset=256", epochs=0)
    _collapse(t)
    d = t.examine(evaluation=None, train_loss=LN10 + 0.001)
    assert d is not None and d.stuck
    fixes = fix_keys(d)
    assert fixes == {"optimizer.lr": "0.005"}, d.fixes
    assert "no batch norm" not in d.cause

    # A constant lr with a warm-up already: no warm-up fix either; a constant lr gets one otherwise.
    t = setup("model.batch_norm=true", "scheduler=none", "scheduler.warmup_epochs=1", "dataset.subset=256", epochs=0)
    _collapse(t)
    assert "scheduler.warmup_epochs" not in fix_keys(t.examine(evaluation=None, train_loss=LN10))
    t = setup("model.batch_norm=true", "scheduler=none", "trainer.epochs=1", "dataset.subset=256", epochs=0)
    _collapse(t)
    assert fix_keys(t.examine(evaluation=None, train_loss=LN10))["scheduler.warmup_epochs"] == "0.5"  # < epochs

    # The collapsed signature needs both: loss at chance and predictions in one or two classes.
    # (The zeroed head also starves the first layer of gradient, which is reported on its own.)
    t = setup("model.batch_norm=true", "dataset.subset=256", epochs=0)
    _collapse(t)
    for d in (t.examine(evaluation=None, train_loss=0.9 * LN10),
              t.examine(evaluation=Evaluation(LN10, 0.1, np.full((10, 10), 5)))):
        assert d is not None and not d.stuck and d.codes == ["vanishing_gradients"], d.text()
        assert "scheduler.warmup_epochs" not in fix_keys(d) and "optimizer.lr" not in fix_keys(d)


def test_cli_stops_the_broken_vgg11_early_with_the_diagnosis(tmp_path):
    """The user's lost 20 hours: VGG-11 without BN, default init, lr 0.1. Now: one epoch, then why."""
    run_dir = tmp_path / "run"
    done = run_cnnlab("model=vgg11", "model.batch_norm=false", "model.init=pytorch_default", "optimizer.lr=0.1",
                      "scheduler=none", "dataset.subset=512", "trainer.epochs=5", "trainer.device=cpu",
                      "trainer.stop_when_stuck=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stuck" and summary["stopped_at_epoch"] == 1 and summary["epochs_completed"] == 1
    diagnosis = summary["diagnosis"]
    assert diagnosis["stuck"] and diagnosis["epoch"] == 1 and "collapsed" in [f["code"] for f in diagnosis["findings"]]
    assert [fix.split(":")[0] for fix in diagnosis["fixes"]][:2] == ["model.batch_norm=true", "model.init=kaiming"]
    log = (run_dir / "train.log").read_text()
    assert "doctor: after epoch 1 training looks stuck" in log and "model.batch_norm=true" in log
    assert math.isfinite(summary["test_acc"])  # a stuck run is still scored, so it can be compared


def test_the_advice_judges_the_lr_applied_now_not_the_configured_peak() -> None:
    """One-cycle warm-up applies 0.002 in epoch 1 while optimizer.lr says 0.05: no "steps too large"."""
    collapsed = [doctor.Finding("collapsed", "loss at chance")]
    base = dict(num_classes=10, chance_loss=LN10, model="alexnet", batch_norm=True, init="kaiming", activation="relu",
                optimizer="sgd", lr=0.5, momentum=0.9, scheduler="onecycle", warmup=0, epochs=10)
    cause, fixes = doctor._advice(collapsed, doctor.Settings(**base, applied_lr=0.002))
    assert "steps of lr" not in cause and "sgd lr 0.5 (0.002 applied now)" in cause
    cause, fixes = doctor._advice(collapsed, doctor.Settings(**base, applied_lr=0.5))
    assert "steps of lr 0.5 with momentum 0.9" in cause
    assert any(f.startswith("optimizer.lr=0.05:") for f in fixes)  # the fix names the configured key's value


def test_a_finding_is_checked_every_epoch_and_cleared_when_the_run_recovers(tmp_path) -> None:
    """The doctor says stuck after epoch 1 (made so here); epoch 2 is checked although doctor_every=5,
    finds the run healthy, and the summary no longer says stuck."""
    code = ("import sys, cnnlab.doctor as d; real, seen = d.examine, []\n"
            "def examine(*a, **k):\n"
            "    seen.append(a[5]); print('examined epoch', a[5], flush=True)\n"
            "    if a[5] == 1: return d.Diagnosis(1, [d.Finding('collapsed', 'made stuck')], 'cause', [])\n"
            "    return real(*a, **k)\n"
            "d.examine = examine\n"
            "from cnnlab.__main__ import main; sys.argv[1:] = sys.argv[2:]; main()")
    import subprocess
    import sys
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, "-", "+debug=smoke", "trainer.doctor_every=5",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "examined epoch 1" in done.stdout and "examined epoch 2" in done.stdout
    assert "doctor: after epoch 1 training looks stuck" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["diagnosis"] is None
