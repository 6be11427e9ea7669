"""The fused optimizer step (cnnlab/fused/optim.py) against torch's own, member by member: the same weights
after several steps with per-member hyperparameters, schedules and gradient clipping, and optimizer states
that a member's own optimizer takes over (its checkpoint resumes alone). And the members' losses in one call."""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cnnlab.fused.optim import FusedSteps, MemberSteps, member_updates
from cnnlab.fused.stacked import StackedModels
from cnnlab.losses import CrossEntropyConfig, MSEConfig, build_loss, build_member_losses

N, STEPS = 4, 6


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # no conv bias before the norm: its gradient is rounding noise, which Adam would scale up to lr
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5))


def member(seed: int, make: type[torch.optim.Optimizer], settings: dict, clip: float | None,
           kernels: bool = False) -> SimpleNamespace:
    """A member as the group sees one (a TrainState's model, optimizer, schedule and grad_clip). kernels: its
    optimizer on torch's fused kernels, as cnnlab builds it on CUDA (its Adam keeps its step counts there)."""
    model = net(seed)
    optimizer = make(model.parameters(), **settings, **({"fused": True} if kernels else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))  # a new lr every step
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler,
                           run=SimpleNamespace(trainer=SimpleNamespace(grad_clip=clip)))


def twin(m: SimpleNamespace) -> SimpleNamespace:
    """The member as its lone run: its own copy, optimizer and schedule."""
    model = copy.deepcopy(m.model)
    optimizer = type(m.optimizer)(model.parameters(), **{k: m.optimizer.defaults[k] for k in (*SETTINGS_KEYS[type(m.optimizer)], "fused")})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, run=m.run)


SETTINGS_KEYS = {torch.optim.SGD: ("lr", "momentum", "weight_decay", "nesterov"),
                 torch.optim.Adam: ("lr", "betas", "eps", "weight_decay"),
                 torch.optim.AdamW: ("lr", "betas", "eps", "weight_decay")}
CASES = {
    "sgd": (torch.optim.SGD, [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.0),
                              dict(lr=0.2, momentum=0.5, weight_decay=0.01), dict(lr=0.1, momentum=0.9, nesterov=True)]),
    "adam": (torch.optim.Adam, [dict(lr=0.01), dict(lr=0.003, betas=(0.8, 0.99)),
                                dict(lr=0.01, weight_decay=0.01), dict(lr=0.02, eps=1e-6)]),
    "adamw": (torch.optim.AdamW, [dict(lr=0.01), dict(lr=0.003, weight_decay=0.1),
                                  dict(lr=0.01, betas=(0.5, 0.9)), dict(lr=0.02, weight_decay=0.0)]),
}


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)


def lone_step(t: SimpleNamespace, x: torch.Tensor, y: torch.Tensor, clip: float | None) -> None:
    t.optimizer.zero_grad()
    loss_of(t.model(x), y).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), clip)
    t.optimizer.step()
    t.scheduler.step()


def fused_step(stacked: StackedModels, updates: FusedSteps, x: torch.Tensor, y: torch.Tensor) -> None:
    losses = torch.vmap(loss_of)(stacked.forward(x, []), y)
    stacked.zero_grad()
    stacked.flat.backward(losses.sum())
    updates.step()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip, kernels", [(None, False), (0.05, False), (None, True)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_fused_step_for_all_members_is_each_members_own_step(case: str, clip: float | None, kernels: bool) -> None:
    """The members first step alone (their optimizers then hold state, as a resumed run's do, which the fused
    buffers take over), then together; their twins step alone throughout."""
    make, settings = CASES[case]
    members = [member(i, make, s, clip, kernels) for i, s in enumerate(settings)]
    twins = [twin(m) for m in members]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        for m in (*members, *twins):
            lone_step(m, x, y, clip)
    stacked = StackedModels([m.model for m in members])
    updates = member_updates(stacked.flat, members)
    assert isinstance(updates, FusedSteps)
    stacked.train()
    for _ in range(STEPS):
        x, y = torch.randn(N, 8, 2, 6, 6, generator=g), torch.randint(0, 5, (N, 8), generator=g)
        fused_step(stacked, updates, x, y)
        for i, t in enumerate(twins):
            lone_step(t, x[i], y[i], clip)
    for m, t in zip(members, twins):
        assert m.optimizer.param_groups[0]["lr"] == t.optimizer.param_groups[0]["lr"]
        for (name, p), q in zip(m.model.named_parameters(), t.model.parameters()):
            assert_close(p, q)
        for b, c in zip(m.model.buffers(), t.model.buffers()):
            assert_close(b, c)

    # each member's optimizer state is its lone run's, saved while fused (a checkpoint) or after: loaded into a
    # fresh optimizer, it steps on alone
    saved = [copy.deepcopy(m.optimizer.state_dict()) for m in members]
    updates.release()
    stacked.release()
    x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    for m, t, while_fused in zip(members, twins, saved):
        ours, theirs = m.optimizer.state_dict(), t.optimizer.state_dict()
        for k, state in while_fused["state"].items():
            for key, value in state.items():
                assert torch.equal(value, ours["state"][k][key])
        assert ours["state"].keys() == theirs["state"].keys()
        for k, state in ours["state"].items():
            assert state.keys() == theirs["state"][k].keys()
            for key, value in state.items():
                assert_close(value, theirs["state"][k][key])
        resumed = twin(m)
        resumed.model.load_state_dict(m.model.state_dict())
        resumed.optimizer.load_state_dict(ours)
        resumed.scheduler.load_state_dict(m.scheduler.state_dict())
        lone_step(resumed, x, y, clip)
        lone_step(t, x, y, clip)
        for p, q in zip(resumed.model.parameters(), t.model.parameters()):
            assert_close(p, q)


def test_an_optimizer_the_rules_do_not_follow_steps_each_member_on_its_own() -> None:
    members = [member(i, torch.optim.RMSprop, dict(lr=0.01), None) for i in range(2)]
    assert isinstance(member_updates(StackedModels([m.model for m in members]).flat, members), MemberSteps)
    members = [member(i, torch.optim.SGD, dict(lr=0.01, dampening=0.5, momentum=0.9), None) for i in range(2)]
    assert isinstance(member_updates(StackedModels([m.model for m in members]).flat, members), MemberSteps)


class Spare(nn.Module):
    """A model with a layer its forward never uses (as a model built for more than one mode may have)."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_the_forward_never_uses_is_left_be_as_alone() -> None:
    """Alone it gets no gradient, so its optimizer neither decays it nor moves its momentum: the members then
    take their own steps, with that parameter's gradient None."""
    models = [Spare() for _ in range(2)]
    members = [SimpleNamespace(model=m, optimizer=(o := torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                                        weight_decay=0.1)),
                               scheduler=torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0),
                               run=SimpleNamespace(trainer=SimpleNamespace(grad_clip=None))) for m in models]
    stacked = StackedModels(models)
    stacked.check(torch.randn(2, 5, 4), SimpleNamespace(autocast=contextlib.nullcontext))
    assert stacked.unused == ["spare.weight", "spare.bias"]
    updates = member_updates(stacked.flat, members, stacked.unused)
    assert isinstance(updates, MemberSteps)
    spare, used = [m.spare.weight.detach().clone() for m in models], [m.used.weight.detach().clone() for m in models]
    stacked.train()
    stacked.zero_grad()
    stacked.flat.backward(stacked.forward(torch.randn(2, 5, 4), []).sum())
    updates.step()
    for m, s, u in zip(members, spare, used):
        assert torch.equal(m.model.spare.weight, s) and not torch.equal(m.model.used.weight, u)
        assert "momentum_buffer" not in m.optimizer.state[m.model.spare.weight]


def test_members_at_different_adam_steps_step_on_their_own_with_their_state_untouched() -> None:
    members = [member(i, torch.optim.Adam, dict(lr=0.01), None) for i in range(2)]
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    lone_step(members[0], x, y, None)
    stacked = StackedModels([m.model for m in members])
    assert isinstance(member_updates(stacked.flat, members), MemberSteps)
    assert not members[1].optimizer.state  # nothing half made: its own first step starts it as alone
    stacked.release()
    lone_step(members[1], x, y, None)
    assert all(s["step"] == 1 for s in members[1].optimizer.state.values())


@pytest.mark.parametrize("cfg", [CrossEntropyConfig(), CrossEntropyConfig(label_smoothing=0.1), MSEConfig(),
                                 MSEConfig(softmax=False)], ids=repr)
def test_the_members_losses_in_one_call_are_each_members_own(cfg: object) -> None:
    logits, y = torch.randn(3, 16, 5), torch.randint(0, 5, (3, 16))
    one, own = build_member_losses(cfg, 5), build_loss(cfg, 5)
    torch.testing.assert_close(one(logits, y), torch.stack([own(logits[i], y[i]) for i in range(3)]))
    torch.testing.assert_close(one(logits, y[0]), torch.stack([own(logits[i], y[0]) for i in range(3)]))  # shared


def test_a_captured_step_is_refused_where_a_graph_could_not_hold_it() -> None:
    """fused/graph.py's graphable: the reasons a group steps eagerly on CUDA, each said (only the device is
    named CUDA here; nothing runs on it)."""
    from cnnlab.fused.graph import graphable

    cuda = torch.device("cuda")

    def group(make: type[torch.optim.Optimizer], settings: dict, dropout: float = 0.0) -> tuple:
        ms = [member(i, make, settings, None) for i in range(2)]
        for m in ms:
            m.model = nn.Sequential(*m.model, nn.Dropout(dropout))
            m.optimizer = make(m.model.parameters(), **settings)
        stacked = StackedModels([m.model for m in ms], "wide")
        return stacked, member_updates(stacked.flat, ms)

    sgd = group(torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    assert graphable(*sgd, torch.device("cpu"), False, False) == "not on CUDA"
    assert graphable(*sgd, cuda, False, False) is None
    assert graphable(*sgd, cuda, False, True) == "the data streams through a DataLoader"
    assert graphable(*sgd, cuda, True, False) == "trainer.precision=bf16"
    assert graphable(*group(torch.optim.SGD, dict(lr=0.1), dropout=0.3), cuda, False, False) == "its members draw dropout masks"
    assert graphable(*group(torch.optim.RMSprop, dict(lr=0.1)), cuda, False, False) == "the members' optimizers step one by one"
    adam = group(torch.optim.Adam, dict(lr=0.01))  # without fused=True its step counts stay on the host
    assert graphable(*adam, cuda, False, False).startswith("the optimizer keeps state on the host")
