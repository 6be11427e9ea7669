"""Reading image files into uint8 tensors: the one decoder behind image datasets and predict.

PIL decodes (torchvision depends on it; torchvision.io's decoders are deprecated since 0.29 in
favour of the separate torchcodec package). Every image comes out with the channel count the
model expects and, when a size is given, the torchvision `Resize(size) + CenterCrop(size)`
framing: shorter side scaled (antialiased), centre cropped.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from cnnlab.checks import ConfigError

# File name endings treated as images when a folder is scanned (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _decode(path: Path, channels: int) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except PermissionError as err:
        raise ConfigError(f"{path} cannot be read ({err}); check its permissions or replace it") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{path} is not a readable image ({err}); delete or replace it") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def fit_size(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [C, h, w] -> [C, H, W]: scale so the image covers H x W (antialiased), then centre crop."""
    height, width = size
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = image.unsqueeze(0).float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
        image = x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top : top + height, left : left + width].contiguous()


def read_image(path: Path, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file as uint8 [channels, H, W] (channels 1 = grayscale, 3 = RGB).

    size None keeps the file's own size. An unreadable file is a ConfigError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file")
    image = _decode(path, channels)
    return fit_size(image, size) if size is not None else image


def read_into(out: torch.Tensor, rows: Sequence[int], paths: Sequence[Path], channels: int,
              size: tuple[int, int], threads: int | None = None, failures: list[str] | None = None) -> None:
    """out[row] = read_image(path) for each (row, path) pair, in threads: decoding releases the GIL.

    With `failures`, an unreadable file's message is appended there (its row left as it was) instead
    of raised, so that a caller can name every such file in one error.
    """
    def one(pair: tuple[int, Path]) -> None:
        try:
            out[pair[0]] = read_image(pair[1], channels, size)
        except ConfigError as err:
            if failures is None:
                raise
            failures.append(str(err))  # list.append is atomic: safe from the pool's threads

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, zip(rows, paths)))
