"""`python -m cnnlab.predict run=DIR images=PATH` (or `cnnlab predict ...`): top-k classes of image files.

    cnnlab predict run=outputs/runs/..._lenet_fashion_mnist images=shoe.png
    cnnlab predict run=DIR images=photos/ k=3 out=predictions.csv    # a folder: every image in it, recursively

Each image is read as the dataset stored its images (channels, and framed to its height x width:
shorter side resized, centre cropped), then goes through the run's pipeline in eval mode
(normalize, centre crops) and the model, in batches. The probability printed is the softmax of
the model's outputs. For cross-entropy runs, and MSE runs with loss.softmax=true (trained to
match the softmax to the one-hot target), that is the model's own probability estimate; for
MSE on raw outputs (loss.softmax=false) it ranks the classes correctly but is not calibrated.

An unreadable image stops the command (exit 2) with a message naming every such file, before
any prediction is printed: a partial table is easy to mistake for a whole one in a script.
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.checkpoint import atomic_write_text
from cnnlab.checks import ConfigError, check_range
from cnnlab.cli import fail, key_value_parser, last
from cnnlab.data.images import IMAGE_EXTENSIONS, is_image, read_into
from cnnlab.inference import OpenRun, open_run, parse_value, writable_file
from cnnlab.losses import MSEConfig

PROG = "cnnlab predict"
KEYS = {
    "run": "the run directory (outputs/runs/...); required",
    "images": "image file(s) or folder(s), comma separated or repeated; folders are searched recursively; required",
    "k": "how many classes to show per image (default 5; at most the number of classes)",
    "checkpoint": "best (default) | last | a checkpoint file",
    "trainer.device": "auto|cpu|cuda|mps; default: the run's own device (auto when that one is absent here)",
    "trainer.eval_batch_size": "images per forward pass (default: the run's)",
    "out": "also write a CSV here: path, rank, class, index, probability",
}
CSV_COLUMNS = ("path", "rank", "class", "index", "probability")


@dataclass
class Prediction:
    path: str
    indices: list[int]  # top-k class indices, most probable first
    probabilities: list[float]


def image_paths(values: list[str]) -> list[Path]:
    """Files as given, folders scanned recursively (sorted); each path once, in order."""
    found: list[Path] = []
    for value in values:
        # a whole value that exists is one path, even with commas in it (sweep run folders have them)
        for text in [value] if Path(value).expanduser().exists() else [v for v in value.split(",") if v]:
            path = Path(text).expanduser()
            if path.is_dir():
                inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
                if not inside:
                    raise ConfigError(f"images={text}: the folder holds no image files "
                                      f"({', '.join(IMAGE_EXTENSIONS)})")
                found += inside
            elif path.is_file():
                found.append(path)
            else:
                raise ConfigError(f"images={text} does not exist; give image files or folders")
    if not found:
        raise ConfigError("images=<file|folder>[,<file>...] is required: the images to classify")
    return list(dict.fromkeys(found))


def read_all(paths: list[Path], opened: OpenRun) -> torch.Tensor:
    """uint8 [N, C, H, W] at the dataset's stored size; every unreadable file named in one error."""
    spec = opened.spec
    images = torch.empty(len(paths), spec.channels, spec.height, spec.width, dtype=torch.uint8)
    failures: list[str] = []
    read_into(images, range(len(paths)), paths, spec.channels, (spec.height, spec.width), failures=failures)
    if failures:
        shown = "; ".join(sorted(failures)[:10]) + (f"; and {len(failures) - 10} more" if len(failures) > 10 else "")
        raise ConfigError(f"{len(failures)} of {len(paths)} image(s) could not be read, nothing was predicted: {shown}")
    return images


@torch.no_grad()
def predict(opened: OpenRun, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, indices) for uint8 [N, C, H, W] images, in batches of trainer.eval_batch_size."""
    ctx = opened.context()
    probs, indices = [], []
    for start in range(0, len(images), opened.run.trainer.eval_batch_size):
        batch = images[start : start + opened.run.trainer.eval_batch_size].to(opened.device)
        with ctx.autocast():
            logits = opened.model(ctx.inputs(batch, train=False))
        top = logits.float().softmax(dim=1).topk(k, dim=1)  # softmax in fp32, whatever the autocast
        probs.append(top.values.cpu())
        indices.append(top.indices.cpu())
    return torch.cat(probs), torch.cat(indices)


def run_predict(args: dict[str, list[str]]) -> tuple[OpenRun, list[Prediction], int, Path | None]:
    k_text = last(args, "k", "5")
    k = parse_value("k", k_text)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"k={k_text} must be a whole number >= 1")
    check_range("k", k, 1)
    out = writable_file(Path(last(args, "out"))) if "out" in args else None
    paths = image_paths(args.get("images", []))
    opened = open_run(last(args, "run"), last(args, "checkpoint", "best"), last(args, "trainer.device"),
                      last(args, "trainer.eval_batch_size"))
    k = min(k, opened.spec.num_classes)
    probs, indices = predict(opened, read_all(paths, opened), k)
    predictions = [Prediction(str(p), i.tolist(), q.tolist()) for p, i, q in zip(paths, indices, probs)]
    if out is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for pred in predictions:
            for rank, (index, prob) in enumerate(zip(pred.indices, pred.probabilities), start=1):
                writer.writerow([pred.path, rank, opened.spec.classes[index], index, f"{prob:.6g}"])
        atomic_write_text(out, buffer.getvalue())
    return opened, predictions, k, out


def format_predictions(opened: OpenRun, predictions: list[Prediction], k: int) -> str:
    classes = opened.spec.classes
    width = max(len(classes[i]) for pred in predictions for i in pred.indices)
    lines = [f"{opened.describe()}: top {k} of {len(classes)} classes for {len(predictions)} image(s)"]
    for pred in predictions:
        lines.append(pred.path)
        lines += [f"  {rank:>2}. {classes[i]:<{width}}  {p:>7.2%}"
                  for rank, (i, p) in enumerate(zip(pred.indices, pred.probabilities), start=1)]
    if isinstance(opened.run.loss, MSEConfig) and not opened.run.loss.softmax:
        lines.append("note: this run was trained with loss=mse on raw outputs (loss.softmax=false): the numbers "
                     "are softmax scores of those outputs; they rank the classes but are not calibrated probabilities")
    lines += [f"note: {note}" for note in opened.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = key_value_parser(PROG, "run=<run dir> images=<file|folder>[,<file>...] [key=value ...]",
                              "Classify image files with a trained run: each image is framed to the run's dataset "
                              "image size, goes through the run's eval pipeline and model, and its top-k classes are "
                              "printed with their softmax probabilities.", KEYS)
    try:
        opened, predictions, k, out = run_predict(parser.parse_args(argv).args)
    except ConfigError as err:
        return fail(PROG, err)
    print(format_predictions(opened, predictions, k))
    if out is not None:
        print(f"csv: {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
