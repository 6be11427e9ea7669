"""hydra/launcher=fused's settings (conf/hydra/launcher/fused.yaml), checked before anything runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnnlab.checks import ConfigError, check_choice

LAUNCHER_TARGET = "hydra_plugins.cnnlab_fused.fused_launcher.FusedLauncher"
MODES = ("auto", "wide", "vmap", "loop")


@dataclass(frozen=True)
class FusedSettings:
    # wide: one step, the layers written out (else vmap); vmap: one step through torch.func.vmap (any model);
    # loop: each member's step in turn; auto: wide on CUDA, loop elsewhere
    fuse: str = "auto"
    max_members: int = 16  # jobs in one group at most
    memory_fraction: float = 0.8  # of the device's free memory a group's training steps may take, by estimate
    cuda_graphs: bool = True  # replay a fused group's step as one captured CUDA graph where it can be (graph.py)

    @classmethod
    def from_config(cls, launcher: Any) -> FusedSettings:
        known = {"fuse", "max_members", "memory_fraction", "cuda_graphs"}
        given = {k: v for k, v in dict(launcher or {}).items() if k != "_target_"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"hydra.launcher.{unknown[0]} is not a setting of hydra/launcher=fused; "
                              f"its settings are: {', '.join(sorted(known))}")
        settings = cls(**given)
        check_choice("hydra.launcher.fuse", settings.fuse, MODES)
        if isinstance(settings.max_members, bool) or not isinstance(settings.max_members, int) or settings.max_members < 1:
            raise ConfigError(f"hydra.launcher.max_members={settings.max_members!r} must be a whole number >= 1")
        fraction = settings.memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"hydra.launcher.memory_fraction={fraction!r} must be a number in (0, 1]")
        if not isinstance(settings.cuda_graphs, bool):
            raise ConfigError(f"hydra.launcher.cuda_graphs={settings.cuda_graphs!r} must be true or false")
        return settings

    def mode_on(self, device_type: str) -> str:
        """The steps a group takes on this device: fuse=auto fuses on CUDA only, where it pays (on an H100
        the hand-written fusion stepped in half vmap's time; on a CPU fusing is compute-bound and no faster)."""
        if self.fuse != "auto":
            return self.fuse
        return "wide" if device_type == "cuda" else "loop"
