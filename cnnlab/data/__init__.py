"""Datasets and augmentation: a registry of datasets, uint8 splits, batches, and a batched
on-device augmentation pipeline.

    spec = spec_for(cfg)                       # shapes, classes, mean/std; reads no pixels
    bundle = load_dataset(cfg, seed)           # uint8 [N, C, H, W] splits (or image files)
    pipeline = build_pipeline(aug_cfg, spec)   # pipeline.output_shape: what the model sees
    x = pipeline(images_on_device, train=True, generator=g)

A dataset is added with `register_dataset` (registry.py) plus conf/dataset/<name>.yaml; the
built-in ones register when their modules are imported below.
"""
from cnnlab.data.augment import OPS, AugmentationConfig, Pipeline, build_pipeline
from cnnlab.data.datasets import DataBundle, load_dataset, spec_for
from cnnlab.data.registry import DatasetConfig, DatasetSpec, Loaded, available, register_dataset, schema_for
from cnnlab.data.splits import FileSplit, Split

# Importing the built-in datasets registers them.
from cnnlab.data import custom, folders, sources, synthetic  # noqa: E402,F401  (isort: skip)
from cnnlab.data.folders import ImageFolderConfig, TinyImageNetConfig  # noqa: E402
from cnnlab.data.synthetic import SyntheticConfig  # noqa: E402

__all__ = [
    "OPS",
    "AugmentationConfig",
    "DataBundle",
    "DatasetConfig",
    "DatasetSpec",
    "FileSplit",
    "ImageFolderConfig",
    "Loaded",
    "Pipeline",
    "Split",
    "SyntheticConfig",
    "TinyImageNetConfig",
    "available",
    "build_pipeline",
    "load_dataset",
    "register_dataset",
    "schema_for",
    "spec_for",
]
