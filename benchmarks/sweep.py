"""What a fused sweep saves: wall time of the 12-run LeNet grid (+experiment=lenet_grid: lr x activation x
loss) one by one, with joblib sharing the device, and fused (hydra/launcher=fused), plus a 4-run ResNet-18
group one by one and fused, on CIFAR-shaped data (dataset=synthetic at 32x32, no files needed).

Every sweep is the real command line, run here one after another, side by side in this one process, so
the ratios compare like with like on a shared machine. Each sweep's runs are read back from their
summary.json: all must complete, and the fused runs' final validation accuracies are compared with the
one-by-one runs' (equal to float tolerance on the CPU; on CUDA, kernels differ by sum order).

The ResNet-18 rows give training throughput as a fraction of the device's dense bf16 peak: images/s x
the model's forward FLOPs per image x 3 (forward and backward), against --peak-tflops.

    python -m benchmarks.sweep                       # CPU: small sizes, a few minutes (make bench-sweep)
    python -m benchmarks.sweep --device cuda --train-size 50000 --epochs 3 --long-epochs 20 --jobs 4 \\
        --resnet-train-size 50000 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def sweep(name: str, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """One sweep's command, timed; its runs' summaries."""
    sweep_dir = out / "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(sweep_dir, ignore_errors=True)  # a killed earlier benchmark's runs would be resumed, not timed
    sweep_dir.mkdir(parents=True)
    started, tic = time.time(), time.perf_counter()
    with (sweep_dir / "console.log").open("w") as console:  # with ms timestamps: breakdown() reads it
        try:
            done = subprocess.run([sys.executable, "-m", "cnnlab", "-m", *args, f"hydra.sweep.dir={sweep_dir}", MS_STAMPS],
                                  stdout=console, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            error = _tail(sweep_dir / "console.log") if done.returncode else None
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - tic
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}
    statuses = sorted({r["status"] for r in runs.values()})
    print(f"{name}: {seconds:.1f} s, {len(runs)} runs {statuses}" + (f"\n{error}" if error else ""), flush=True)
    return {"name": name, "seconds": seconds, "runs": runs, "error": error, "dir": sweep_dir, "started": started}


MS_STAMPS = "hydra.job_logging.formatters.simple.format='[%(asctime)s.%(msecs)03d] %(message)s'"
_STAMP = re.compile(r"\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] (.*)")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def _steps_seconds(metrics: Path) -> float:
    """A run's training steps' seconds, from its metrics.csv's images/s (a fused member's: its group's)."""
    size = json.loads((metrics.parent / "summary.json").read_text())["train_size"]
    with metrics.open() as f:
        return sum(size / float(row["images_per_second"]) for row in csv.DictReader(f) if row["images_per_second"])


def breakdown(result: dict) -> str:
    """Where a one-group fused sweep's wall time went, from its console's ms timestamps and the
    members' metrics.csv: start-up (process, configs, the members opened), the epochs (the steps, one for all
    or each member's in turn, and the members' validation, test scores, checkpoints and doctor), the members'
    ends (test score, plots), and the sweep report with the exit."""
    day = datetime.datetime.fromtimestamp(result["started"])
    t0 = day.hour * 3600 + day.minute * 60 + day.second + day.microsecond / 1e6
    stamps = []  # (seconds since the start, message)
    for line in (Path(result["dir"]) / "console.log").read_text(errors="replace").splitlines():
        found = _STAMP.search(line)
        if found:
            h, m, s, ms, text = found.groups()
            stamps.append(((int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 - t0) % 86400, text))
    group = next((t for t, text in stamps if text.startswith("fused group of")), None)
    epochs = [t for t, text in stamps if re.match(r"epoch \d+/\d+ ", text)]
    runs = sorted(Path(result["dir"]).glob("*/metrics.csv"))
    if group is None or not epochs or not runs:
        return "n/a (no fused group's epochs in its console log)"
    steps = [_steps_seconds(path) for path in runs]
    together = json.loads((runs[0].parent / "summary.json").read_text())["fused_group"]["mode"] != "loop"
    steps = steps[0] if together else sum(steps)  # one step for all, or each member's in turn
    span = epochs[-1] - group
    return (f"start-up {group:.1f} s (process, configs, members opened); epochs {span:.1f} s, of which the steps "
            f"{steps:.1f} s and the members' validation, test scores, checkpoints and doctor {span - steps:.1f} s; "
            f"the members' ends (test score, plots) {stamps[-1][0] - epochs[-1]:.1f} s; the sweep report and exit "
            f"{result['seconds'] - stamps[-1][0]:.1f} s")


def extrapolate(result: dict, epochs: int) -> float:
    """The sweep's wall time had each run trained `epochs` epochs: its measured wall time plus, per run, the
    epochs it lacks at that run's mean epoch_seconds (training + validation; the first epoch, with its warm-up,
    left out of the mean when there are more). Per-epoch test scoring is not added, so the estimate is low."""
    extra, runs = 0.0, sorted(Path(result["dir"]).glob("*/metrics.csv"))
    if len(runs) != len(result["runs"]):
        raise ValueError(f"{result['name']}: {len(result['runs'])} runs, {len(runs)} with metrics: cannot extrapolate")
    for path in runs:
        with path.open() as f:
            times = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
        if not times:
            raise ValueError(f"{path} has no epochs: cannot extrapolate")
        steady = times[1:] or times
        extra += max(epochs - len(times), 0) * sum(steady) / len(steady)
    return result["seconds"] + extra


def grid_args(a: argparse.Namespace, epochs: int) -> list[str]:
    return ["+experiment=lenet_grid", "dataset=synthetic", "dataset.image_size=32", f"dataset.train_size={a.train_size}",
            f"dataset.test_size={a.test_size}", f"trainer.epochs={epochs}", f"trainer.device={a.device}"]


def resnet_args(a: argparse.Namespace) -> list[str]:
    precision = ["trainer.precision=bf16"] if a.device == "cuda" else []
    return ["model=resnet18", "dataset=synthetic", "dataset.image_size=32", f"dataset.train_size={a.resnet_train_size}",
            f"dataset.test_size={a.test_size}", "trainer.epochs=1", f"trainer.batch_size={a.resnet_batch}",
            f"trainer.device={a.device}", "trainer.seed=0,1,2,3", *precision]


def agreement(fused: dict, alone: dict) -> str:
    """The largest difference in final validation accuracy between a fused run and its lone twin."""
    pairs = [(fused["runs"][k].get("final_val_acc"), alone["runs"][k].get("final_val_acc"))
             for k in fused["runs"] if k in alone["runs"]]
    diffs = [abs(f - g) for f, g in pairs if f is not None and g is not None]
    return f"{max(diffs):.4f}" if diffs else "n/a"


def throughput(result: dict) -> float:
    """Training images per second of the whole sweep's training. The members of a fused group share one
    wall time (each records it); runs one by one, and members in a loop, add up."""
    runs = list(result["runs"].values())
    images = sum((r.get("train_size") or 0) * (r.get("epochs_completed") or 0) for r in runs)
    together = all((r.get("fused_group") or {}).get("mode") in ("wide", "vmap") for r in runs)
    times = [r.get("train_seconds") or 0 for r in runs]
    seconds = max(times) if together else sum(times)
    return images / seconds if seconds else 0.0


def table(rows: list[dict], base: dict) -> list[str]:
    lines = ["| sweep | runs completed | wall time | vs one by one | max diff in final val acc vs one by one |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        done = sum(s["status"] == "completed" for s in r["runs"].values())
        lines.append(f"| {r['name']} | {done} of {len(r['runs'])} | {r['seconds']:.1f} s | "
                     f"{base['seconds'] / r['seconds']:.2f}x | {agreement(r, base) if r is not base else '-'} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-size", type=int, default=5000, help="training images of the LeNet grid's data")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2, help="epochs per run in the side-by-side grid")
    p.add_argument("--long-epochs", type=int, default=0, help="also time the fused grid alone at this many epochs")
    p.add_argument("--jobs", type=int, default=2, help="joblib's n_jobs")
    p.add_argument("--resnet-train-size", type=int, default=512)
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, for the ResNet rows")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--work", type=Path, default=Path("outputs/bench_sweep"))
    p.add_argument("--parts", default="grid,long,resnet", help="which tables: grid (side by side), long, resnet")
    a = p.parse_args()
    parts = a.parts.split(",")
    out = a.out / f"fused_sweep_{a.device}.md"
    lines = [f"### Fused sweeps on {_device_name(a.device)} ({a.device})", "",
             f"`python -m benchmarks.sweep {' '.join(sys.argv[1:])}`; torch {_torch_version()}; {time.strftime('%Y-%m-%d')}"]
    tables = {"grid": _grid_rows, "long": _long_rows, "resnet": _resnet_rows}
    for part in parts:  # in the order given: what matters most first, when device time is short
        if part not in tables:
            raise SystemExit(f"--parts: {part!r} is not one of {', '.join(tables)}")
        lines += ["", *tables[part](a)]
        a.out.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")  # after each part: a time cap loses only what is left
    print("\n".join(lines))


def _grid_rows(a: argparse.Namespace) -> list[str]:
    grid = grid_args(a, a.epochs)
    fused = sweep("fused", [*grid, "hydra/launcher=fused"], a.work, a.timeout)
    shared = sweep(f"joblib n_jobs={a.jobs}", [*grid, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={a.jobs}"],
                   a.work, a.timeout)
    alone = sweep("one by one", grid, a.work, a.timeout)
    rows = [f"The 12-run LeNet grid (`+experiment=lenet_grid`: lr x activation x loss), {a.epochs} epochs per run on "
            f"CIFAR-shaped synthetic data ({a.train_size} training images):", "",
            *table([alone, shared, fused], alone), "", f"Where the fused sweep's time went: {breakdown(fused)}."]
    if a.long_epochs > a.epochs:
        try:
            estimate = f"{extrapolate(alone, a.long_epochs):.1f} s"
        except ValueError as err:
            estimate = f"n/a ({err})"
        rows += ["", f"One by one at {a.long_epochs} epochs per run, extrapolated from these one-by-one runs' own "
                     f"epoch_seconds (`extrapolate`): {estimate}."]
    return rows


def _long_rows(a: argparse.Namespace) -> list[str]:
    if not a.long_epochs:
        return []
    long = sweep(f"fused, {a.long_epochs} epochs", [*grid_args(a, a.long_epochs), "hydra/launcher=fused"], a.work, a.timeout)
    return [f"The fused grid at {a.long_epochs} epochs per run: {long['seconds']:.1f} s wall time, "
            f"{sum(s['status'] == 'completed' for s in long['runs'].values())} of {len(long['runs'])} runs completed. "
            f"Where the time went: {breakdown(long)}."]


def _resnet_rows(a: argparse.Namespace) -> list[str]:
    rows = []
    for name, extra in (("ResNet-18 x4 one by one", []), ("ResNet-18 x4 fused", ["hydra/launcher=fused"])):
        r = sweep(name, [*resnet_args(a), *extra], a.work, a.timeout)
        runs = list(r["runs"].values())
        flops = (runs[0].get("flops_per_image") or 0) if runs else 0
        speed = throughput(r)
        peak = f"{speed * flops * 3 / (a.peak_tflops * 1e12):.1%}" if a.peak_tflops and flops else "n/a"
        rows.append(f"| {name} | {sum(s['status'] == 'completed' for s in runs)} of {len(runs)} | {r['seconds']:.1f} s | "
                    f"{speed:,.0f} | {peak} |")
    peak = f"as a fraction of {a.peak_tflops:g} TFLOP/s" if a.peak_tflops else "(no --peak-tflops given)"
    return [f"A 4-run ResNet-18 group (trainer.seed=0..3), 1 epoch of {a.resnet_train_size} images at batch "
            f"{a.resnet_batch}{', bf16' if a.device == 'cuda' else ''}; training images/s over all runs, and the "
            f"training FLOP/s (3 x forward) {peak}:", "",
            "| sweep | runs completed | wall time | training images/s | of bf16 peak |", "|---|---|---:|---:|---:|", *rows]


def _device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU"


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
