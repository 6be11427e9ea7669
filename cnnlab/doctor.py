"""The stuck-training doctor: recognise the signatures of a run that is not learning, say why, and
name the overrides of *this* config that fix it.

After an epoch the trainer calls `examine(...)` with one training batch. It runs one forward and
backward pass in train mode and measures

- collapse: the loss sits at the chance level (ln(classes) for cross-entropy) while the predictions
  fall into one or two classes: the net gives every image the same output ("VGG-11 at 2.3026, 10%");
- vanishing gradients: the first weighted layer's gradient is negligible relative to its weights,
  absolutely and compared with the last weighted layer's, so the early layers do not learn;
- dead ReLUs: most rectifier units output <= 0 for every image (and position) of the batch, so
  no gradient flows through them.

It returns a `Diagnosis` (None when nothing is wrong): the findings with their numbers, the likely
cause in terms of the config, and the fixes (`key=value: why`) that change something in this config.
`Diagnosis.stuck` is the collapsed signature, on which `trainer.stop_when_stuck` ends a run.

`examine` leaves no trace on training: parameters are not updated, every buffer (BatchNorm running
statistics, num_batches_tracked) is restored, the gradients the model had before are put back
(None stays None), each module's train/eval mode is restored and the global torch RNG (CPU and the
model's accelerator) is forked, so dropout draws do not shift the run's random stream. The data
generator in `ctx` is not touched: inputs are built without augmentation.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlab.engine import Evaluation, StepContext

# --------------------------------------------------------------------------- thresholds

# Collapse: |loss - chance loss| below this fraction of the chance loss. A stuck net sits within
# ~0.1% of ln(10) (2.304 vs 2.3026); a net that learns anything is >10% below it after one epoch.
COLLAPSE_LOSS_REL_TOL = 0.02
# Collapse: the two most predicted classes take at least this share of the predictions. With 10
# balanced classes a working net spreads ~20% over its top two; a stuck one puts ~100% in one.
COLLAPSE_TOP_SHARE = 0.9
COLLAPSE_TOP_K = 2  # "one or two classes": a collapsed net sometimes flips between two outputs

# Dead ReLUs: a finding when more than this fraction of all rectifier units is dead on the batch.
# A healthy ReLU net has a few percent dead; past half, most of the capacity gets no gradient.
DEAD_FRACTION = 0.5

# Vanishing gradients, with r = ||grad W|| / ||W|| of a weighted layer (one SGD step at lr moves W
# by ~lr * r, relative). A finding when the first layer's r is below VANISH_REL of the last layer's
# (the early layers learn >= 10^4 times slower than the head; measured at init: healthy LeNet,
# VGG-BN, ResNet, GoogLeNet 1e-2..1, sigmoid LeNet 1e-4, the no-BN default-init VGG-11 5e-5, a
# sigmoid no-BN VGG-11 1e-9), or when it is below VANISH_ABS outright (even lr 1 would move the
# first layer by < 1e-6 per step; this catches a collapsed net whose head gradient is small too),
# the latter only while the batch loss is above VANISH_MIN_LOSS of chance, so a net that has simply
# fitted its data (every gradient small) is not flagged.
VANISH_REL = 1e-4
VANISH_ABS = 1e-6
VANISH_MIN_LOSS = 0.1

# SGD steps of an effective lr / (1 - momentum) at least this large are called large in the cause:
# 0.05 with momentum 0.9 (the default, 0.5) trains LeNet and BN nets; no-BN nets need less.
LARGE_STEP = 0.5

SATURATING = ("sigmoid", "tanh")
RECTIFIERS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.RReLU, nn.PReLU)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- what the doctor is told


@dataclass(frozen=True)
class Settings:
    """The run's values the findings and the advice depend on (build.doctor_settings fills them in
    from the config); a model, optimizer or scheduler without one of them leaves it None."""

    num_classes: int
    chance_loss: float  # the loss of a net that gives every image the same uniform guess
    model: str = "model"
    batch_norm: bool | None = None
    init: str | None = None
    activation: str | None = None
    optimizer: str = "optimizer"
    lr: float | None = None  # optimizer.lr, as configured: what a fix changes
    applied_lr: float | None = None  # the lr the optimizer applies now (a schedule's warm-up, say); None: lr
    momentum: float | None = None
    scheduler: str | None = None
    warmup: float | None = None  # scheduler.warmup_epochs
    epochs: int | None = None
    grad_clip: float | None = None
    has_grad_clip: bool = True  # trainer.grad_clip is advised only where it exists and is off


# --------------------------------------------------------------------------- results


@dataclass
class Finding:
    code: str  # "collapsed" | "vanishing_gradients" | "dead_relus"
    message: str  # one sentence with the measured numbers
    evidence: dict[str, Any] = field(default_factory=dict)  # the numbers, JSON-serialisable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "evidence": dict(self.evidence)}


@dataclass
class Diagnosis:
    epoch: int
    findings: list[Finding]
    cause: str  # the likely cause, specific to the config
    fixes: list[str]  # "key=value: why", each an override that changes this config

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    @property
    def stuck(self) -> bool:
        """Training makes no progress: the loss is at chance and the predictions collapsed."""
        return "collapsed" in self.codes

    def finding(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "stuck": self.stuck,
            "findings": [f.to_dict() for f in self.findings],
            "cause": self.cause,
            "fixes": list(self.fixes),
        }

    def text(self) -> str:
        head = "training looks stuck" if self.stuck else "training looks unhealthy"
        lines = [f"doctor: after epoch {self.epoch} {head}:"]
        lines += [f"  - {f.message}" for f in self.findings]
        lines.append(f"  likely cause: {self.cause}")
        if self.fixes:
            lines.append("  try:")
            lines += [f"    {fix}" for fix in self.fixes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


@dataclass
class _Probe:
    """What one forward/backward pass measured."""

    loss: float
    predictions: torch.Tensor | None  # eval-mode argmax of the batch, on the CPU, when asked for
    dead: list[tuple[str, int, int]]  # (layer, dead units, units) per rectifier call
    grads: list[tuple[str, float, float]]  # (layer, ||grad W||, ||W||) of the weighted layers, module order
    grads_finite: bool


def _unit_alive(out: torch.Tensor) -> torch.Tensor:
    """Per unit (dim 1: channel of a 4D map, feature of a 2D one), whether any sample/position is > 0."""
    positive = out.detach() > 0
    if positive.dim() < 2:
        return positive.reshape(-1, 1).any(0)
    return positive.transpose(0, 1).reshape(positive.shape[1], -1).any(1)


@contextmanager
def _preserved(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore buffers, gradients, per-module train/eval mode and the torch RNG on exit."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    if device.type in ("cuda", "mps"):
        rng = torch.random.fork_rng(devices=[device], device_type=device.type)
    else:
        rng = torch.random.fork_rng(devices=[])
    try:
        for p in params:
            p.grad = None  # our backward must not add to the run's gradients
        with rng:
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g
        for m, training in modes:
            m.training = training


def _probe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext,
           predict: bool = True) -> _Probe:
    names = {m: n or type(m).__name__ for n, m in model.named_modules()}
    dead: list[tuple[str, int, int]] = []
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        # Runs right after the module's forward, so an inplace ReLU's output is still its own.
        if not isinstance(output, torch.Tensor) or output.numel() == 0:
            return
        alive = _unit_alive(output)
        calls[module] = calls.get(module, 0) + 1
        name = names[module] if calls[module] == 1 else f"{names[module]}#{calls[module]}"
        dead.append((name, int((~alive).sum()), int(alive.numel())))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, RECTIFIERS)]
    try:
        model.train()
        x = ctx.inputs(images, train=False)  # no augmentation: draws nothing from ctx.generator
        with torch.enable_grad():
            with ctx.autocast():
                logits = model(x)
                loss = ctx.loss_fn(logits, labels)
            if loss.requires_grad:
                loss.backward()
    finally:
        for h in handles:
            h.remove()

    grads: list[tuple[str, float, float]] = []
    finite = True
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, WEIGHTED) and isinstance(w, torch.Tensor) and w.grad is not None:
            g, n = float(w.grad.detach().float().norm()), float(w.detach().float().norm())
            finite = finite and math.isfinite(g)
            grads.append((name, g, n))

    # Predictions as the model makes them at evaluation (BN running statistics, no dropout).
    predictions = None
    if predict:
        model.eval()
        with torch.no_grad(), ctx.autocast():
            predictions = model(x).argmax(1).cpu()
    return _Probe(float(loss.detach()), predictions, dead, grads, finite)


# --------------------------------------------------------------------------- checks


def _check_collapse(loss: float, counts: np.ndarray, chance: float, num_classes: int,
                    source: str) -> Finding | None:
    total = int(counts.sum())
    if total == 0 or not math.isfinite(loss):
        return None
    order = np.argsort(-counts, kind="stable")[:COLLAPSE_TOP_K]
    top_share = float(counts[order].sum()) / total
    if abs(loss - chance) >= COLLAPSE_LOSS_REL_TOL * chance or top_share < COLLAPSE_TOP_SHARE:
        return None
    top_one = float(counts[order[0]]) / total
    which = f"class {int(order[0])}" if top_one >= COLLAPSE_TOP_SHARE else \
        f"classes {int(order[0])} and {int(order[1])}"
    return Finding(
        "collapsed",
        f"{source} loss {loss:.4f} is at chance level (ln({num_classes}) = {math.log(num_classes):.4f}"
        + (f", chance {chance:.4f}" if abs(chance - math.log(num_classes)) > 1e-12 else "")
        + f") and {top_share:.0%} of the {total} {source} predictions go to {which}",
        {
            "loss": float(loss),
            "chance_loss": float(chance),
            "ln_num_classes": math.log(num_classes),
            "loss_gap": float(loss - chance),
            "top_classes": [int(c) for c in order],
            "top_class_share": top_one,
            "top2_share": top_share,
            "predictions": total,
            "source": source,
        },
    )


def _check_dead(dead: list[tuple[str, int, int]]) -> Finding | None:
    units = sum(n for _, _, n in dead)
    if not units:  # no rectifier in the model (sigmoid, tanh, GELU, ...): nothing to measure
        return None
    n_dead = sum(d for _, d, _ in dead)
    fraction = n_dead / units
    if fraction <= DEAD_FRACTION:
        return None
    # The worst layer: the highest dead fraction, the earliest of equals (where the dying starts).
    i = max(range(len(dead)), key=lambda j: (dead[j][1] / dead[j][2], -j))
    worst, worst_dead, worst_units = dead[i]
    return Finding(
        "dead_relus",
        f"{fraction:.0%} of the {units} ReLU units output zero for every image of the batch "
        f"(worst: {worst}, {worst_dead}/{worst_units} dead)",
        {
            "dead_fraction": fraction,
            "dead_units": n_dead,
            "units": units,
            "worst_layer": worst,
            "worst_layer_dead_fraction": worst_dead / worst_units,
            "worst_layer_units": worst_units,
            "per_layer": {name: [d, n] for name, d, n in dead},  # layer -> [dead units, units]
        },
    )


def _relative(g: float, w: float) -> float:
    return g / w if w > 0 else g


def _check_vanishing(grads: list[tuple[str, float, float]], finite: bool, loss: float,
                     chance: float) -> Finding | None:
    if not finite or len(grads) < 2:  # non-finite: divergence is reported elsewhere
        return None
    (first, g1, w1), (last, g2, w2) = grads[0], grads[-1]
    r1, r2 = _relative(g1, w1), _relative(g2, w2)
    ratio = r1 / r2 if r2 > 0 else math.inf
    absolute = r1 < VANISH_ABS and math.isfinite(loss) and loss > VANISH_MIN_LOSS * chance
    if not (ratio < VANISH_REL or absolute):
        return None
    return Finding(
        "vanishing_gradients",
        f"the first layer ({first}) gets a gradient of {r1:.2e} of its weight norm, "
        f"{ratio:.1e} times the last layer's ({last}, {r2:.2e}): the early layers barely learn",
        {
            "first_layer": first,
            "first_grad_norm": g1,
            "first_weight_norm": w1,
            "first_relative": r1,
            "last_layer": last,
            "last_grad_norm": g2,
            "last_weight_norm": w2,
            "last_relative": r2,
            "first_to_last": ratio,
            "criterion": "relative" if ratio < VANISH_REL else "absolute",
        },
    )


# --------------------------------------------------------------------------- cause and fixes


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _describe(s: Settings) -> str:
    """'vgg11 (no batch norm, PyTorch default init, relu, sgd lr 0.1, momentum 0.9, schedule none, no warm-up)'."""
    parts = []
    if s.batch_norm is not None:
        parts.append("batch norm" if s.batch_norm else "no batch norm")
    if s.init is not None:
        parts.append("PyTorch default init" if s.init == "pytorch_default" else f"{s.init} init")
    if s.activation is not None:
        parts.append(s.activation)
    if s.lr is not None:
        now = s.applied_lr if s.applied_lr is not None else s.lr
        parts.append(f"{s.optimizer} lr {_fmt(s.lr)}" + (f" ({_fmt(now)} applied now)" if now != s.lr else ""))
    if s.momentum:
        parts.append(f"momentum {_fmt(s.momentum)}")
    if s.scheduler is not None:
        parts.append(f"schedule {s.scheduler}")
    if s.warmup == 0 and s.scheduler != "onecycle":
        parts.append("no warm-up")
    return f"{s.model} ({', '.join(parts)})" if parts else s.model


SYMPTOMS = {
    "collapsed": "it gives every image the same output, so the loss stays at chance",
    "vanishing_gradients": "the gradient fades on its way back, so the first layers barely learn",
    "dead_relus": "most ReLU units output zero for every image, so no gradient flows through them",
}


def _advice(findings: list[Finding], s: Settings) -> tuple[str, list[str]]:
    """The likely cause (the config's settings that explain the findings) and the fixes that change them."""
    codes = {f.code for f in findings}
    collapsed, vanishing, dead = "collapsed" in codes, "vanishing_gradients" in codes, "dead_relus" in codes
    fixes: dict[str, str] = {}  # override key -> "key=value: why"; the first reason for a key wins
    reasons: list[str] = []

    def add(key: str, value: str, why: str) -> None:
        fixes.setdefault(key, f"{key}={value}: {why}")

    no_bn = s.batch_norm is False
    default_init = s.init == "pytorch_default"
    saturating = s.activation in SATURATING
    lr, momentum = s.lr, s.momentum or 0.0
    applied = s.applied_lr if s.applied_lr is not None else lr  # a step is as large as the lr applied now
    effective = None if applied is None else applied / (1 - momentum)  # SGD's step size once momentum builds up
    large_step = effective is not None and effective >= LARGE_STEP
    no_warmup = s.warmup == 0 and s.scheduler not in (None, "onecycle")

    if no_bn and (collapsed or vanishing or dead):
        reasons.append("without batch norm nothing keeps each layer's activations and gradients at a usable scale")
        add("model.batch_norm", "true",
            "normalises every layer, so the signal and its gradient survive the depth at this lr")
    if default_init and (collapsed or vanishing):
        reasons.append("PyTorch's default init shrinks the signal (and the gradient) in every layer, "
                       "so the output barely depends on the image")
        add("model.init", "kaiming", "He init keeps the signal's scale from layer to layer")
    if saturating and (collapsed or vanishing):
        reasons.append(f"{s.activation} saturates and passes back at most "
                       f"{'a quarter' if s.activation == 'sigmoid' else 'all'} of the gradient, less once saturated")
        add("model.activation", "relu", "ReLU passes the gradient through unchanged where it is active")
    if dead and s.activation == "relu":
        add("model.activation", "leaky_relu",
            "keeps a small gradient for negative inputs, so dead units can come back")
    if (collapsed or dead) and lr is not None:
        if large_step:
            reasons.append(f"steps of lr {_fmt(applied)}" + (f" with momentum {_fmt(momentum)} (effective "
                           f"{_fmt(effective)})" if momentum else "") + " are large enough to throw it "
                           + ("into the constant-output state" if collapsed else "past the point where units die"))
        add("optimizer.lr", _fmt(lr / 10), f"an order of magnitude below {_fmt(lr)}: smaller first steps keep "
            + ("the net out of the constant-output state" if collapsed else "units from being pushed below zero for good"))
    if collapsed and no_warmup:
        if large_step:
            reasons.append("there is no warm-up to start with smaller steps")
        add("scheduler.warmup_epochs", _warmup_value(s),
            "ramps the lr up from a tenth, so the net reaches a trainable state before the full steps")
    if dead and s.has_grad_clip and not s.grad_clip:
        add("trainer.grad_clip", "1.0", "caps the occasional huge step that pushes units below zero")
    symptoms = "; ".join(SYMPTOMS[f.code] for f in findings)
    cause = f"{_describe(s)}: {symptoms}."
    if reasons:
        cause += " Likely because " + "; ".join(reasons) + "."
    order = ["model.batch_norm", "model.init", "model.activation", "optimizer.lr", "scheduler.warmup_epochs",
             "trainer.grad_clip"]
    keys = sorted(fixes, key=lambda k: order.index(k) if k in order else len(order))
    return cause, [fixes[k] for k in keys]


def _warmup_value(s: Settings) -> str:
    # validate() needs warmup_epochs < trainer.epochs; a one-epoch run gets half an epoch.
    return "1" if s.epochs is None or s.epochs > 1 else "0.5"


# --------------------------------------------------------------------------- entry point


def examine(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext,
            settings: Settings, epoch: int, train_loss: float, evaluation: Evaluation | None) -> Diagnosis | None:
    """Diagnose a run from one training batch after `epoch`; None when nothing is wrong.

    `images` uint8 [B, C, H, W] on the model's device and `labels` [B]; `evaluation` the epoch's
    validation result, or None without a val split (then the batch's predictions and train_loss
    are used for the collapse check). Leaves no trace on the model, its gradients or the torch RNG.
    """
    use_val = evaluation is not None and evaluation.confusion is not None and np.asarray(evaluation.confusion).sum() > 0
    with _preserved(model, ctx.device):
        probe = _probe(model, images, labels, ctx, predict=not use_val)

    k, chance = settings.num_classes, settings.chance_loss
    if use_val:
        counts = np.asarray(evaluation.confusion).sum(axis=0)
        collapse = _check_collapse(float(evaluation.loss), counts, chance, k, "validation")
    else:
        counts = np.bincount(probe.predictions.numpy(), minlength=k)
        collapse = _check_collapse(float(train_loss), counts, chance, k, "training")
    findings = [f for f in (collapse, _check_vanishing(probe.grads, probe.grads_finite, probe.loss, chance),
                            _check_dead(probe.dead)) if f is not None]
    if not findings:
        return None
    cause, fixes = _advice(findings, settings)
    return Diagnosis(epoch, findings, cause, fixes)


def divergence_hints(s: Settings) -> list[str]:
    """What to try when the loss became NaN/inf: the overrides of this config that make steps tamer."""
    hints = [f"a lower learning rate (optimizer.lr={s.lr / 10:g})"] if s.lr is not None else []
    if not s.warmup:
        hints.append("a warm-up (scheduler.warmup_epochs=1)")
    if s.has_grad_clip and not s.grad_clip:
        hints.append("gradient clipping (trainer.grad_clip=1.0)")
    if s.batch_norm is False:
        hints.append("batch norm (model.batch_norm=true)")
    return hints
