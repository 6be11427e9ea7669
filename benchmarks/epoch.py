"""Epoch time of cnnlab against the loop users write today, side by side in one process.

    python -m benchmarks.epoch [cnnlab overrides ...] [--epochs 2] [--workers 0,2] [--variants fp32,bf16+cl]

Every path trains the same model (identical initial weights), at the same batch size, on the same
training split, with the same optimizer at a constant learning rate, for the same epochs:

- reference: what users write today. A per-sample dataset that does what torchvision's MNIST and
  CIFAR datasets do (a PIL image from the uint8 array, then ToTensor/augmentation/Normalize
  transforms), a DataLoader with each --workers count, fp32, eager, `loss.item()` every step.
- cnnlab: the training step and data path of `python -m cnnlab`: uint8 data resident on the
  device, batched on-device augmentation, one host sync per epoch; one row per --variants entry
  (fp32, channels_last or cl, bf16, compile, graphs = compile with CUDA graphs (mode reduce-overhead),
  stream = the streaming data path (DataLoader workers from host memory, dataset.num_workers),
  and combinations joined by +).
- bare: the model alone on resident, already-normalised random tensors: forward, backward, step.
  It is the floor: 1 - bare/path is the path's data-stall fraction (time not spent in the model).

Times are the last epoch's (steady state: no worker start-up, autotuning or compilation); the first
epoch's is reported too. Results go to --out as CSV and a markdown table. Speed is a ratio
measured in one run, never an absolute in a test.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from PIL import Image

from cnnlab.config import RunConfig, config_dir, validate
from cnnlab.data import Split, load_dataset
from cnnlab.data.augment import Pipeline
from cnnlab.losses import build_loss
from cnnlab.models.card import model_card
from cnnlab.optim import build_optimizer, build_scheduler
from cnnlab.build import configure_determinism, prepare, select_device
from cnnlab.data.batches import Batches, StreamingBatches, stream_workers
from cnnlab.engine import EpochState, StepContext, evaluate, run_steps

# dense bf16 tensor-core peak (FLOP/s) by GPU name: the denominator of the achieved fraction
PEAK_BF16 = {"H200": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}
# graphs: compile mode reduce-overhead; stream: batches through DataLoader workers (dataset.loader=streaming)
VARIANT_FLAGS = ("fp32", "channels_last", "bf16", "compile", "graphs", "stream")


@dataclass
class Row:
    path: str
    epoch_seconds: float
    first_epoch_seconds: float
    images_per_second: float
    test_acc: float | None = None
    speedup_vs_reference: float | None = None
    data_stall: float | None = None  # 1 - bare time / this path's time
    tflops: float | None = None  # achieved, forward + backward (3x the forward FLOPs)
    peak_fraction: float | None = None  # of the device's dense bf16 peak


@dataclass
class Bench:
    run: RunConfig
    device: torch.device
    model: torch.nn.Module  # initial weights, on the CPU; every path trains a deep copy
    train: Split  # CPU uint8
    test: Split
    pipeline: Pipeline  # cnnlab's augmentation for this config
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flops_per_image: int
    epochs: int


def setup(overrides: Sequence[str], epochs: int) -> Bench:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["scheduler=none", *overrides])  # constant lr in every path
    run = validate(cfg)
    configure_determinism(run.trainer.deterministic)  # cudnn autotuning as in a run, for every path
    prep = prepare(run)  # seeds and builds the model as a run would
    data = load_dataset(run.dataset, seed=run.trainer.seed)
    card = model_card(prep.model, run.model.name, prep.pipeline.output_shape, prep.spec.num_classes)
    return Bench(run, select_device(run.trainer.device), prep.model, data.train, data.test, prep.pipeline,
                 prep.spec.num_classes, prep.spec.mean, prep.spec.std, card.flops_per_image, epochs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_epochs(bench: Bench, one_epoch: Callable[[], int]) -> tuple[list[float], int]:
    """Wall time of each epoch, with the device synchronised at the edges."""
    times = []
    for _ in range(bench.epochs):
        _sync(bench.device)
        tic = time.perf_counter()
        seen = one_epoch()
        _sync(bench.device)
        times.append(time.perf_counter() - tic)
    return times, seen


def _optimizer(bench: Bench, model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(bench.run.optimizer, model.parameters())


# ---------------------------------------------------------------- reference: the loop users write


class PilDataset(torch.utils.data.Dataset):
    """Per sample, what torchvision's MNIST/CIFAR datasets do: PIL image from the array, then transforms."""

    def __init__(self, split: Split, transform: Callable) -> None:
        array = split.images.permute(0, 2, 3, 1).numpy()
        self.images = array[..., 0] if array.shape[-1] == 1 else array  # MNIST is mode "L", CIFAR "RGB"
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_transforms(bench: Bench, train: bool) -> T.Compose:
    """torchvision transforms for cnnlab's augmentation list (random ops on training only)."""
    ops: list = []
    for entry in bench.run.augmentation.ops:
        name, p = (entry, {}) if isinstance(entry, str) else (entry["op"], {k: v for k, v in entry.items() if k != "op"})
        size = bench.train.images.shape[-2:]
        if name == "random_crop" and train:
            ops.append(T.RandomCrop(p.get("size") or tuple(size), padding=p.get("padding", 4)))
        elif name == "hflip" and train:
            ops.append(T.RandomHorizontalFlip(p.get("p", 0.5)))
        elif name == "vflip" and train:
            ops.append(T.RandomVerticalFlip(p.get("p", 0.5)))
        elif name == "rotation" and train:
            ops.append(T.RandomRotation(p.get("degrees", 15)))
        elif name == "color_jitter" and train:
            ops.append(T.ColorJitter(p.get("brightness", 0.4), p.get("contrast", 0.4), p.get("saturation", 0.4)))
        elif name in ("resize", "center_crop"):
            ops.append((T.Resize if name == "resize" else T.CenterCrop)(p["size"]))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(bench.mean, bench.std)])


def reference(bench: Bench, workers: int) -> tuple[Row, torch.nn.Module]:
    device, t = bench.device, bench.run.trainer
    model = copy.deepcopy(bench.model).to(device)
    optimizer = _optimizer(bench, model)
    loader = torch.utils.data.DataLoader(
        PilDataset(bench.train, reference_transforms(bench, train=True)), batch_size=t.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def one_epoch() -> int:
        model.train()
        running, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)  # the per-step sync users write
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        return seen

    times, seen = _timed_epochs(bench, one_epoch)
    test = PilDataset(bench.test, reference_transforms(bench, train=False))
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=t.eval_batch_size, num_workers=workers):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return Row(f"reference, DataLoader num_workers={workers}", times[-1], times[0], seen / times[-1],
               correct / len(test)), model


# ---------------------------------------------------------------- cnnlab's path and the bare model


def _variant(name: str) -> dict[str, bool]:
    flags = set(name.split("+"))
    unknown = flags - set(VARIANT_FLAGS) - {"cl"}
    if unknown:
        raise SystemExit(f"unknown variant flag(s) {', '.join(sorted(unknown))}; use {', '.join(VARIANT_FLAGS)} joined by +")
    return {"channels_last": bool(flags & {"channels_last", "cl"}), "bf16": "bf16" in flags,
            "compile": bool(flags & {"compile", "graphs"}), "graphs": "graphs" in flags, "stream": "stream" in flags}


def _prepared_model(bench: Bench, flags: dict[str, bool]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to train, module whose weights it updates)."""
    model = copy.deepcopy(bench.model).to(bench.device)
    if flags["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if not flags["compile"]:
        return model, model
    return torch.compile(model, mode="reduce-overhead" if flags["graphs"] else "default"), model


def cnnlab_path(bench: Bench, variant: str) -> Row:
    flags, device, t = _variant(variant), bench.device, bench.run.trainer
    test = bench.test.to(device)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    ctx = StepContext(bench.pipeline, build_loss(bench.run.loss, bench.num_classes), device,
                      flags["bf16"] and device.type == "cuda", flags["channels_last"], generator)
    step_model, model = _prepared_model(bench, flags)
    if flags["stream"]:  # from host memory through DataLoader workers, as for data larger than the device
        batches = StreamingBatches(bench.train, t.batch_size, device, stream_workers(bench.run.dataset.num_workers, bench.train),
                                   shuffle=True, drop_last=True, generator=generator)
    else:
        train = bench.train.to(device)
        batches = Batches(train.images, train.labels, t.batch_size, shuffle=True, drop_last=True, generator=generator)
    optimizer = _optimizer(bench, model)
    scheduler = build_scheduler(bench.run.scheduler, optimizer, len(batches), bench.epochs)

    def one_epoch() -> int:
        state = run_steps(step_model, batches, ctx, optimizer, scheduler, EpochState.begin(batches, optimizer, device))
        return state.results()[2]

    times, seen = _timed_epochs(bench, one_epoch)
    accuracy = evaluate(model, test, ctx, t.eval_batch_size, bench.num_classes).acc
    return Row(f"cnnlab {variant}", times[-1], times[0], seen / times[-1], accuracy)


def bare(bench: Bench, variant: str) -> Row:
    """The model alone: forward, backward and step on resident normalised tensors, nothing else."""
    flags, device, t = _variant(variant), bench.device, bench.run.trainer
    n = len(bench.train) // t.batch_size * t.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *bench.train.images.shape[1:], generator=g).to(device)
    if flags["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, bench.num_classes, (n,), generator=g).to(device)
    step_model, model = _prepared_model(bench, flags)
    optimizer = _optimizer(bench, model)
    dtype = torch.bfloat16 if flags["bf16"] and device.type == "cuda" else None

    def one_epoch() -> int:
        step_model.train()
        for i in range(0, n, t.batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(step_model(x[i:i + t.batch_size]), y[i:i + t.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return n

    times, seen = _timed_epochs(bench, one_epoch)
    return Row(f"bare model {variant}", times[-1], times[0], seen / times[-1])


# ---------------------------------------------------------------- the table


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def benchmark(bench: Bench, workers: Sequence[int], variants: Sequence[str]) -> pd.DataFrame:
    refs = [reference(bench, w)[0] for w in workers]
    best_ref = min(refs, key=lambda r: r.epoch_seconds)
    rows = list(refs)
    bares = {}
    for variant in variants:
        rows.append(cnnlab_path(bench, variant))
        # the bare model does not read data: a variant that only changes the data path shares its floor
        model_variant = "+".join(f for f in variant.split("+") if f != "stream") or "fp32"
        if model_variant not in bares:
            bares[model_variant] = bare(bench, model_variant)
            rows.append(bares[model_variant])
        bares[variant] = bares[model_variant]
    bare_fp32 = bares.get("fp32") or bare(bench, "fp32")
    device_peak = peak(bench.device)
    for row in rows:
        row.speedup_vs_reference = best_ref.epoch_seconds / row.epoch_seconds
        floor = bare_fp32 if row.path.startswith("reference") else bares.get(row.path.split(" ")[-1])
        if floor is not None and not row.path.startswith("bare"):
            row.data_stall = max(0.0, 1 - floor.epoch_seconds / row.epoch_seconds)
        if bench.device.type == "cuda":
            row.tflops = 3 * bench.flops_per_image * row.images_per_second / 1e12
            row.peak_fraction = row.tflops * 1e12 / device_peak if device_peak else None
    return pd.DataFrame([asdict(r) for r in rows])


def write(table: pd.DataFrame, bench: Bench, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    r = bench.run
    slug = f"{r.model.name}_{r.dataset.name}_b{r.trainer.batch_size}_{bench.device.type}"
    table.to_csv(out / f"{slug}.csv", index=False)
    header = (f"### {r.model.name} on {r.dataset.name}, batch {r.trainer.batch_size}, {bench.epochs} epochs, "
              f"{machine(bench.device)}\n\n`{command}`  \n"
              f"{len(bench.train)} training images; torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d')}\n\n")
    shown = table.copy()
    for column in ("epoch_seconds", "first_epoch_seconds"):
        shown[column] = shown[column].map("{:.2f}".format)
    shown["images_per_second"] = shown["images_per_second"].map("{:,.0f}".format)
    for column in ("test_acc", "data_stall", "peak_fraction"):
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.1%}" if column != "test_acc" else f"{v:.4f}")
    shown["speedup_vs_reference"] = shown["speedup_vs_reference"].map("{:.2f}x".format)
    shown["tflops"] = shown["tflops"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    if bench.device.type != "cuda":
        shown = shown.drop(columns=["tflops", "peak_fraction"])
    path = out / f"{slug}.md"
    path.write_text(header + shown.to_markdown(index=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="cnnlab config overrides, e.g. model=resnet18 dataset=cifar10")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path; the last one is timed (default 2)")
    parser.add_argument("--workers", default="0,2", help="DataLoader num_workers for the reference, best one wins")
    parser.add_argument("--variants", default="fp32", help="cnnlab variants: fp32, channels_last (cl), bf16, compile, graphs, joined by +")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the CSV and markdown go")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    bench = setup(args.overrides, args.epochs)
    table = benchmark(bench, [int(w) for w in args.workers.split(",")], args.variants.split(","))
    path = write(table, bench, args.out, "python -m benchmarks.epoch " + " ".join(sys.argv[1:] if argv is None else argv))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
