"""dataset=synthetic: seeded random images, learnable, no files needed. For smoke runs and tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlab.checks import ConfigError, check_range, is_whole
from cnnlab.data.registry import DatasetConfig, DatasetSpec, Loaded, check_whole, register_dataset
from cnnlab.data.splits import Split
from cnnlab.memory import check_fits


@dataclass
class SyntheticConfig(DatasetConfig):
    """Seeded random images for smoke runs; each class is a smooth random uint8 prototype plus
    Gaussian noise, so a model learns it quickly (accuracy well above chance in a few steps)."""

    name: str = "synthetic"
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32  # height = width, pixels
    train_size: int = 512  # examples, before the val split
    test_size: int = 256
    noise: float = 0.25  # std of the per-pixel noise, as a fraction of the 0..255 range
    seed: int = 0  # seeds the images themselves; the split uses load_dataset's seed

    def validate(self, prefix: str = "dataset") -> None:
        for key, low in (("num_classes", 2), ("channels", 1), ("image_size", 1),
                         ("train_size", 1), ("test_size", 1)):
            check_whole(f"{prefix}.{key}", getattr(self, key), low)
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)):
            raise ConfigError(f"{prefix}.noise={self.noise!r} must be a number >= 0")
        check_range(f"{prefix}.noise", self.noise, 0)
        if not is_whole(self.seed):
            raise ConfigError(f"{prefix}.seed={self.seed!r} must be a whole number")
        super().validate(prefix)
        pixels = self.channels * self.image_size**2
        # uint8 splits, and float32 noise and prototypes while the larger one is made
        need = (self.train_size + self.test_size) * pixels + 8.0 * max(self.train_size, self.test_size) * pixels
        check_fits(f"{prefix}.train_size={self.train_size}, {prefix}.test_size={self.test_size} synthetic images of "
                   f"{self.channels}x{self.image_size}x{self.image_size}", need, torch.device("cpu"),
                   f"lower {prefix}.train_size, {prefix}.test_size or {prefix}.image_size")

    def train_pool_size(self) -> int | None:
        return min(self.train_size, self.subset) if self.subset else self.train_size


def synthetic_spec(cfg: SyntheticConfig) -> DatasetSpec:
    c, s = cfg.channels, cfg.image_size
    return DatasetSpec("synthetic", tuple(f"class_{i}" for i in range(cfg.num_classes)), c, s, s, (0.5,) * c, (0.5,) * c)


def load_synthetic(cfg: SyntheticConfig, spec: DatasetSpec) -> Loaded:
    """Each class: a smooth random prototype (a 4x4 random grid upsampled, so it survives
    pooling and crops) plus per-pixel Gaussian noise. Labels are balanced, then shuffled."""
    g = torch.Generator().manual_seed(int(cfg.seed) % 2**63)
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    coarse = torch.rand(k, c, 4, 4, generator=g) * 255
    prototypes = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        noise = torch.randn(n, c, s, s, generator=g) * (cfg.noise * 255)
        images = (prototypes[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return Split(images, labels)

    train = make(cfg.train_size)
    return Loaded(train, make(cfg.test_size))


register_dataset("synthetic", schema=SyntheticConfig, spec=synthetic_spec, load=load_synthetic)
