"""Looking inside a trained model: feature maps of test images at one conv layer."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
from matplotlib.figure import Figure  # the object API: no backend chosen (see report/run.py)
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.data.splits import Split
from cnnlab.engine import StepContext


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model: nn.Module, layer: str | None, key: str = "viz.layer") -> str:
    """The chosen conv layer's module name; null means the last conv layer."""
    names = conv_layer_names(model)
    if not names:
        raise ConfigError(f"{key}: this model has no conv layer to show")
    if layer is None:
        return names[-1]
    if layer not in names:
        raise ConfigError(f"{key}={layer!r} is not a conv layer of this model; choose one of: {', '.join(names)}")
    return layer


@torch.no_grad()
def capture(model: nn.Module, layer: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations of `layer` [N, C, h, w], predicted classes [N]) for preprocessed inputs."""
    store: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: store.__setitem__("out", out))
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    return store["out"].float(), logits.argmax(1)


def _mosaic(image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """One RGB tile grid: the input image first, then each channel map (own min-max, viridis).

    torchvision's make_grid lays the tiles out (a square-ish grid, white gaps)."""
    from torchvision.utils import make_grid  # imported only here: torchvision's import pulls in torch._dynamo (~1 s)

    h = image.shape[0]
    cmap = matplotlib.colormaps["viridis"]
    tiles = [image]
    for fmap in maps:
        lo, hi = fmap.min(), fmap.max()
        tiles.append(cmap((fmap - lo) / (hi - lo) if hi > lo else np.zeros_like(fmap))[..., :3])
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()
    grid = make_grid(batch, nrow=math.ceil(math.sqrt(len(tiles))), padding=max(1, h // 16), pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def plot_feature_maps(
    path: Path,
    images: torch.Tensor,
    activations: torch.Tensor,
    predicted: Sequence[int],
    labels: Sequence[int],
    classes: Sequence[str],
    channels: int,
    title: str,
) -> int:
    """Write one panel per image (input + its first `channels` maps); returns the panel count."""
    n, _, h, w = images.shape
    shown = min(channels, activations.shape[1])
    # feature maps are upsampled (nearest) to the image size so every tile has the same size
    maps = F.interpolate(activations[:, :shown].cpu(), size=(h, w), mode="nearest").numpy()
    pictures = images.cpu().float().div(255).permute(0, 2, 3, 1).numpy()
    if pictures.shape[-1] == 1:
        pictures = np.repeat(pictures, 3, axis=-1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(_mosaic(pictures[i], maps[i]), interpolation="nearest")
        ax.set_axis_off()
        ok = predicted[i] == labels[i]
        ax.set_title(f"pred: {classes[predicted[i]]}\ntrue: {classes[labels[i]]}", fontsize=9,
                     color="tab:green" if ok else "tab:red")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    panels = sum(1 for ax in fig.axes if ax.images)  # what was drawn, not what was asked for
    return panels


def draw_feature_maps(path: Path, model: nn.Module, layer: str, panels: Split, ctx: StepContext,
                      classes: Sequence[str], channels: int, model_name: str) -> dict[str, Any]:
    """feature_maps.png for the images of `panels` (on the model's device); returns what summary.json records."""
    images, labels = panels.images, panels.labels
    with ctx.autocast():
        activations, predicted = capture(model, layer, ctx.inputs(images, train=False))
    drawn = plot_feature_maps(
        path, images, activations, predicted.tolist(), labels.tolist(), classes, channels,
        title=f"{model_name}: feature maps at {layer} "
        f"({activations.shape[1]} channels, {activations.shape[2]}x{activations.shape[3]})",
    )
    return {"file": path.name, "layer": layer, "panels": drawn, "channels_shown": min(channels, activations.shape[1]),
            "predicted": predicted.tolist(), "true": labels.tolist()}
