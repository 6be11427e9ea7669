"""One training step of a fused group, as cnnlab's fused launcher takes it, five ways side by side:

    alone        each member's own step in turn (engine.train_step: what N jobs, or fuse=loop, do)
    vmap         one vmapped forward and backward (fused/stacked.py), then each member's own optimizer
                 and schedule step (fused/optim.py's MemberSteps: how the fused launcher stepped before)
    vmap+fused   the same forward and backward, then one optimizer step for all members (FusedSteps)
    wide+fused   the forward and backward with the layers written out (fused/wide.py, fuse=wide), then
                 one optimizer step for all
    wide+graph   the same step captured once as a CUDA graph and replayed (fused/graph.py; on the CPU its
                 captured function is called instead: the same ops, no gain there)

on N LeNets of the lenet_grid kind: CIFAR-shaped input, each member its own lr, half sigmoid and half tanh,
SGD with momentum or Adam, built as cnnlab builds them (on CUDA with torch's fused optimizer kernels). Prints ms per step of all N members, the ratio to `alone`, and the ops each
step dispatches to the device (counted with a TorchDispatchMode): on a GPU each is a kernel launch, but for
wide+graph on CUDA only what the host still dispatches (the input's copy, the optimizer's numbers): the graph's
kernels go in one launch.

    python -m benchmarks.fused_step [--members 12] [--batch 64] [--steps 20] [--rounds 5] [--optimizer sgd] [--fused-kernels] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cnnlab.data.augment import Pipeline
from cnnlab.engine import EpochState, StepContext, train_step
from cnnlab.fused.graph import GraphedSteps
from cnnlab.fused.optim import FusedSteps, MemberSteps, member_updates
from cnnlab.fused.stacked import StackedModels
from cnnlab.losses import CrossEntropyConfig, build_loss, build_member_losses
from cnnlab.models import build_model
from cnnlab.models.lenet import LeNetConfig
from cnnlab.optim import AdamConfig, SGDConfig, build_optimizer


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops += 1
        return func(*args, **(kwargs or {}))


def members(n: int, a: argparse.Namespace, device: torch.device) -> list[SimpleNamespace]:
    """N LeNets, each with its optimizer as cnnlab builds it (on CUDA: torch's fused kernels), or with
    --fused-kernels those kernels on any device: the CPU then dispatches what the GPU would launch."""
    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = build_model(LeNetConfig(name="lenet", activation=("sigmoid", "tanh")[i % 2]), 3, 10, (32, 32)).to(device)
        lr = (0.1, 0.01, 0.001)[i % 3] / (1 if a.optimizer == "sgd" else 100)
        cfg = SGDConfig(name="sgd", lr=lr) if a.optimizer == "sgd" else AdamConfig(name="adam", lr=lr)
        opt = build_optimizer(cfg, model.parameters())
        if a.fused_kernels:
            opt = type(opt)(model.parameters(), **{**opt.defaults, "fused": True, "foreach": None})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        out.append(SimpleNamespace(model=model, optimizer=opt, scheduler=sched,
                                   run=SimpleNamespace(trainer=SimpleNamespace(grad_clip=None))))
    return out


def context(device: torch.device) -> StepContext:
    return StepContext(Pipeline([], [], (3, 32, 32), (3, 32, 32)), build_loss(CrossEntropyConfig(name="cross_entropy"), 10), device, False, False, None)


def way(name: str, n: int, a: argparse.Namespace, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    ms, ctx = members(n, a, device), context(device)
    if name == "alone":
        state = EpochState.begin(SimpleNamespace(order=lambda: None), ms[0].optimizer, device)
        return lambda x, y: [train_step(m.model, x, y, ctx, m.optimizer, m.scheduler, state) for m in ms]
    member_losses = build_member_losses(CrossEntropyConfig(name="cross_entropy"), 10)
    stacked = StackedModels([m.model for m in ms], name.split("+")[0])
    stacked.train()
    fused = name.endswith(("+fused", "+graph"))
    updates = member_updates(stacked.flat, ms) if fused else MemberSteps(ms)
    assert isinstance(updates, FusedSteps) == fused

    def step(x: torch.Tensor, y: torch.Tensor, sums: EpochState | None = None,
             update: Callable[[], None] = updates.step) -> None:
        logits = stacked.forward(x, [], batched_input=False)
        losses = member_losses(logits, y)
        stacked.zero_grad()
        stacked.flat.backward(losses.sum())
        update()
        if sums is not None:
            sums.count(losses, logits, y)
    if not name.endswith("+graph"):
        return lambda x, y: step(ctx.inputs(x, train=True), y)
    graph = GraphedSteps(stacked, updates, n, device, simulate=device.type != "cuda")
    sums = EpochState(None, 0.0, torch.zeros(n, device=device), torch.zeros(n, dtype=torch.long, device=device),
                      torch.full((n,), -1, dtype=torch.long, device=device))

    def graphed(x: torch.Tensor, y: torch.Tensor) -> None:
        x = ctx.inputs(x, train=True)
        if not graph.step(x, y, sums, step):  # a capture that failed (said in the log): eager
            step(x, y, sums)
    return graphed


def ops_per_step(step: Callable, data: list) -> int:
    for i in range(5):  # warm-up: first calls trace and allocate, and wide+graph captures after 3 eager steps
        step(*data[i % len(data)])
    with Count() as count:
        step(*data[0])
    return count.ops


def seconds_per_step(step: Callable, data: list, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for x, y in data:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="members' optimizers with torch's fused kernels, as cnnlab builds them on CUDA")
    a = parser.parse_args(argv)
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (a.batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device), torch.randint(0, 10, (a.batch,), generator=g).to(device))
            for _ in range(a.steps)]
    kernels = ", members' optimizers fused=True" if a.fused_kernels else ""
    print(f"{a.members} x LeNet ({a.optimizer}{kernels}), batch {a.batch}, {a.steps} steps x {a.rounds} rounds on {device} "
          f"(median of the rounds; the ways take turns, so a busy machine slows all alike)")
    names = ("alone", "vmap", "vmap+fused", "wide+fused", "wide+graph")
    steps = {name: way(name, a.members, a, device) for name in names}
    ops = {name: ops_per_step(step, data) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(a.rounds):
        for name, step in steps.items():
            times[name].append(seconds_per_step(step, data, device))
    base = statistics.median(times["alone"])
    for name in names:
        seconds = statistics.median(times[name])
        print(f"  {name:<11} {seconds * 1000:8.2f} ms/step  {base / seconds:5.2f}x  {ops[name]:5d} ops/step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
