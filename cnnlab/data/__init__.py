"""Datasets and augmentation: config schemas, static specs, uint8 tensor loaders, and a
batched on-device augmentation pipeline.

    spec = spec_for(cfg)                       # shapes, classes, mean/std; reads no pixels
    bundle = load_dataset(cfg, seed)           # uint8 [N, C, H, W] splits on the CPU
    pipeline = build_pipeline(aug_cfg, spec)   # pipeline.output_shape: what the model sees
    x = pipeline(images_on_device, train=True, generator=g)
"""
from cnnlab.data.augment import OPS, AugmentationConfig, Pipeline, build_pipeline
from cnnlab.data.datasets import (
    DataBundle,
    DatasetConfig,
    DatasetSpec,
    FileSplit,
    ImageFolderConfig,
    Split,
    SyntheticConfig,
    TinyImageNetConfig,
    available,
    load_dataset,
    schema_for,
    spec_for,
)

__all__ = [
    "OPS",
    "AugmentationConfig",
    "DataBundle",
    "DatasetConfig",
    "DatasetSpec",
    "FileSplit",
    "ImageFolderConfig",
    "Pipeline",
    "Split",
    "SyntheticConfig",
    "TinyImageNetConfig",
    "available",
    "build_pipeline",
    "load_dataset",
    "schema_for",
    "spec_for",
]
