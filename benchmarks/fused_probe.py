"""How to fuse a sweep's small models, measured before building it (issue: fused sweeps).

N LeNets, each with its own weights, its own batch and its own lr, trained with SGD two ways, side by
side in this one process:

    sequential  N separate modules, one forward/backward/step each (what N jobs do, minus start-up)
    vmap        torch.func.stack_module_state + vmap(grad(functional_call)): one wide step for all N
    grouped     HFTA's fusion written out for LeNet: each conv one grouped conv (groups=N) over the
                members' channels side by side, each linear one batched matmul (baddbmm)

and checks that all three compute the same thing: after the steps, every member's weights agree with its
sequential twin to float tolerance. Prints step times and the ratio to sequential.

    python -m benchmarks.fused_probe [--members 12] [--batch 64] [--steps 30] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

from cnnlab.models import build_model
from cnnlab.models.lenet import LeNetConfig


def members(n: int, device: torch.device) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build_model(LeNetConfig(name="lenet"), 1, 10, (28, 28)).to(device))
    return out


def batches(n: int, batch: int, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, batch, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n, batch), generator=g).to(device))
            for _ in range(steps)]


def sequential(models: list[nn.Module], data, lrs: torch.Tensor) -> float:
    opts = [torch.optim.SGD(m.parameters(), lr=float(lr)) for m, lr in zip(models, lrs)]
    loss_fn = nn.CrossEntropyLoss()
    tic = time.perf_counter()
    for x, y in data:
        for i, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[i]), y[i]).backward()
            opt.step()
    return time.perf_counter() - tic


def fused_vmap(models: list[nn.Module], data, lrs: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    step = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    tic = time.perf_counter()
    for x, y in data:
        grads = step(params, buffers, x, y)
        for k in params:  # per-member lr: one fused multiply-add over the stacked tensor
            params[k] = params[k] - lrs.view(-1, *[1] * (params[k].dim() - 1)) * grads[k]
    return time.perf_counter() - tic, params


def grouped_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """N LeNets at once: x is [N, B, C, H, W], the result [N, B, classes]."""
    n, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])  # [B, N*C, H, W]: member i owns channels i*C..

    def conv(h: torch.Tensor, name: str, padding: int) -> torch.Tensor:
        w = p[f"{name}.weight"]
        return F.conv2d(h, w.reshape(-1, *w.shape[2:]), p[f"{name}.bias"].reshape(-1), padding=padding, groups=n)

    h = F.max_pool2d(F.relu(conv(h, "features.0", 2)), 2)
    h = F.max_pool2d(F.relu(conv(h, "features.4", 0)), 2)
    h = h.reshape(b, n, -1).transpose(0, 1)  # [N, B, 16*5*5]: each member's own flatten
    for name in ("classifier.1", "classifier.5", "classifier.9"):
        h = torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), h, p[f"{name}.weight"].transpose(1, 2))
        h = F.relu(h) if name != "classifier.9" else h
    return h


def fused_grouped(models: list[nn.Module], data, lrs: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    params = {k: v.detach().clone().requires_grad_() for k, v in stack_module_state(models)[0].items()}
    tic = time.perf_counter()
    for x, y in data:
        logits = grouped_forward(params, x)
        # the sum of the members' mean losses: each member's gradient is its own loss's
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        loss.view(y.shape).mean(1).sum().backward()
        with torch.no_grad():
            for k, v in params.items():
                v -= lrs.view(-1, *[1] * (v.dim() - 1)) * v.grad
                v.grad = None
    return time.perf_counter() - tic, {k: v.detach() for k, v in params.items()}


def worst_difference(fused: dict[str, torch.Tensor], alone: list[nn.Module]) -> float:
    return max(float((fused[k][i] - p.detach()).abs().max() / p.detach().abs().max().clamp_min(1e-12))
               for i, m in enumerate(alone) for k, p in m.named_parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data = batches(args.members, args.batch, args.steps, device)
    lrs = torch.logspace(-1, -3, args.members, device=device)
    warm = data[:3]
    for way in (sequential, fused_vmap, fused_grouped):
        way(members(args.members, device), warm, lrs)
    alone = members(args.members, device)
    t_seq = sequential(alone, data, lrs)
    per = 1000 / args.steps
    print(f"{args.members} x LeNet, batch {args.batch}, {args.steps} steps on {device}")
    print(f"  sequential {t_seq * per:8.2f} ms/step   1.00x")
    for name, way in (("vmap", fused_vmap), ("grouped", fused_grouped)):
        seconds, fused = way(members(args.members, device), data, lrs)
        print(f"  {name:<10} {seconds * per:8.2f} ms/step   {t_seq / seconds:.2f}x   "
              f"worst relative weight difference {worst_difference(fused, alone):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
