"""Which jobs of a sweep can train together as one fused model, and in what groups.

Members of a group share one step, so they must agree on everything that shapes it: model family and
architecture, dataset, batch size, epochs, augmentation, precision, device, optimizer and scheduler
kinds. They may differ where the fused step keeps a value per member (MEMBER_KEYS): optimizer and
schedule hyperparameters, the loss, the dropout rate, the activation, and the seed (each member its own
initial weights, data order and augmentation draws). Settings that change no result (progress bar, eval
batch size, trackers, report, plots, the run's name) do not keep jobs apart.

The activation is a member key because it is cheap where it matters: a per-member activation costs one
elementwise op per choice per site (stacked.py), while keeping the members apart would halve a grid's
groups and double its steps (benchmarks/results/fused_sweep_*.md).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# group -> keys a member may set for itself; "*" = every key but the group's name
MEMBER_KEYS: dict[str, tuple[str, ...]] = {
    "optimizer": ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov", "alpha"),
    "scheduler": ("*",),
    "loss": ("*", "name"),  # cross-entropy or MSE, each with its own settings
    "model": ("dropout", "activation"),
    "trainer": ("seed",),
}
# whole groups and keys that change no result: they never keep two jobs apart
IGNORED = ("viz", "report", "logger", "name", "trainer.progress", "trainer.eval_batch_size", "trainer.resume",
           "dataset.root", "dataset.num_workers")


def fusion_key(config: dict[str, Any]) -> str:
    """What a job must share with the other members of its group, as one comparable string."""
    shared = {}
    for group, value in config.items():
        if group in IGNORED:
            continue
        if isinstance(value, dict):
            own = MEMBER_KEYS.get(group, ())
            shared[group] = {k: v for k, v in value.items() if f"{group}.{k}" not in IGNORED
                             and not (k in own or ("*" in own and k != "name"))}
        else:
            shared[group] = value
    return json.dumps(shared, sort_keys=True, default=str)


def plan_groups(configs: Sequence[dict[str, Any]], max_members: int) -> list[list[int]]:
    """The jobs (by index) in groups of at most max_members that can share a step, in job order: a
    group starts at its first job; a job that fuses with no other is a group of one (it runs as usual)."""
    if max_members < 1:
        raise ValueError(f"max_members must be >= 1, got {max_members}")
    by_key: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        by_key.setdefault(fusion_key(config), []).append(index)
    groups = [members[i:i + max_members] for members in by_key.values() for i in range(0, len(members), max_members)]
    return sorted(groups, key=lambda group: group[0])
