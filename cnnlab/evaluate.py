"""`python -m cnnlab.evaluate run=DIR` (or `cnnlab evaluate ...`): score a trained checkpoint on a test set.

    cnnlab evaluate run=outputs/runs/..._lenet_fashion_mnist                  # best.pt on the run's own test set
    cnnlab evaluate run=DIR checkpoint=last dataset.subset=1000
    cnnlab evaluate run=DIR dataset=mnist dataset.root=/data out=eval_mnist   # another dataset of the same shape
    cnnlab evaluate run=DIR feature_maps=true viz.layer=features.3 out=fm     # feature maps, after training

Writes confusion_matrix.csv/.png, per_class_accuracy.csv, confused_pairs.csv, eval_summary.json (and
feature_maps.png when asked) into
<run>/eval/<dataset>_<checkpoint>[_<overrides>] (or out=); the run's own files are never touched.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cnnlab import report, viz
from cnnlab.checkpoint import write_json
from cnnlab.checks import ConfigError
from cnnlab.cli import fail, key_value_parser, last
from cnnlab.config import config_dir, typed_group
from cnnlab.data import DatasetConfig, build_pipeline, load_dataset, spec_for
from cnnlab.data.batches import head, placed
from cnnlab.engine import Evaluation, evaluate
from cnnlab.inference import OpenRun, check_writable_dir, open_run, parse_value, with_stats

PROG = "cnnlab evaluate"
KEYS = {
    "run": "the run directory (outputs/runs/...); required",
    "checkpoint": "best (default: the weights the run's own test score used) | last | a checkpoint file",
    "dataset": "another dataset config (conf/dataset/<name>.yaml); default: the run's own dataset config",
    "dataset.<key>": "change one key of that dataset config, e.g. dataset.subset=1000, dataset.root=/data",
    "trainer.device": "auto|cpu|cuda|mps; default: the run's own device (auto when that one is absent here)",
    "trainer.eval_batch_size": "images per forward pass; changes speed, not results (default: the run's)",
    "out": "output folder; default <run>/eval/<dataset>_<checkpoint>[_<dataset overrides>]",
    "feature_maps": "true: also draw feature_maps.png, the first test images inside the model (default false)",
    "viz.layer": "the conv layer whose maps are drawn, by module name; default: the run's viz.layer, else the last",
    "viz.num_images": "test images drawn, one panel each (default: the run's viz.num_images)",
    "viz.channels": "feature maps drawn per image (default: the run's viz.channels)",
}
# dataset keys that do not change which images are scored stay out of the output folder's name
UNNAMED_KEYS = ("root", "download", "loader", "num_workers")


def dataset_options() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "dataset").glob("*.yaml"))


def dataset_config(run_dataset: DatasetConfig, name: str | None, overrides: dict[str, Any]) -> DatasetConfig:
    """The run's dataset config, or conf/dataset/<name>.yaml, with `dataset.<key>=` overrides applied."""
    if name is None:
        node = OmegaConf.create(dataclasses.asdict(run_dataset))
    else:
        options = dataset_options()
        if name not in options:
            raise ConfigError(f"dataset={name} is not a dataset config; choose one of: {', '.join(options)}")
        node = OmegaConf.load(Path(config_dir()) / "dataset" / f"{name}.yaml")
    for key, value in overrides.items():
        if key == "name":
            raise ConfigError("dataset.name cannot be changed on its own; pick another dataset with "
                              f"dataset=<name> (one of: {', '.join(dataset_options())})")
        OmegaConf.update(node, key, value, merge=False)
    return typed_group("dataset", node)


def fitted_pipeline(opened: OpenRun, cfg: DatasetConfig):
    """The run's eval pipeline for `cfg`'s images, refused unless what comes out fits the model."""
    trained, spec = opened.spec, spec_for(cfg)
    problems = []
    if spec.channels != trained.channels:
        problems.append(f"{spec.channels} channel(s) vs {trained.channels}")
    if spec.num_classes != trained.num_classes:
        problems.append(f"{spec.num_classes} classes vs {trained.num_classes}")
    if not problems:
        try:
            pipeline = build_pipeline(opened.run.augmentation, with_stats(spec, trained))
        except ConfigError as err:
            problems.append(f"the run's augmentation does not apply to its {spec.height}x{spec.width} images: {err}")
        else:
            if pipeline.output_shape != opened.pipeline.output_shape:
                shape = "x".join(map(str, pipeline.output_shape))
                problems.append(f"images of {shape} after the run's augmentation vs "
                                f"{'x'.join(map(str, opened.pipeline.output_shape))}")
    if problems:
        raise ConfigError(f"dataset {cfg.name} ({spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes) "
                          f"does not fit this model, trained on {trained.name} "
                          f"({trained.channels}x{trained.height}x{trained.width}, {trained.num_classes} classes): "
                          f"{'; '.join(problems)}")
    return pipeline


def default_out(opened: OpenRun, cfg: DatasetConfig, overrides: dict[str, Any]) -> Path:
    label = opened.checkpoint.stem
    named = [f"{k}={v}" for k, v in overrides.items() if k not in UNNAMED_KEYS]
    name = f"{cfg.name}_{label}" + (f"_{','.join(named)}" if named else "")
    return opened.run_dir / "eval" / name.replace("/", "-").replace(" ", "-")


def run_evaluation(args: dict[str, list[str]], argv: list[str]) -> tuple[dict[str, Any], Evaluation, tuple[str, ...], Path]:
    opened = open_run(last(args, "run"), last(args, "checkpoint", "best"), last(args, "trainer.device"),
                      last(args, "trainer.eval_batch_size"))
    overrides = {k.split(".", 1)[1]: parse_value(k, v[-1]) for k, v in args.items() if k.startswith("dataset.")}
    cfg = dataset_config(opened.run.dataset, last(args, "dataset"), overrides)
    pipeline = fitted_pipeline(opened, cfg)
    drawing = feature_map_settings(opened, args)  # checked before the data is loaded, like out=
    out = Path(last(args, "out")).expanduser() if "out" in args else default_out(opened, cfg, overrides)
    check_writable_dir(out)  # before the data is loaded: a bad out= costs nothing

    tic = time.perf_counter()
    # the run's seed: the same subset of the test set as the run drew, when dataset.subset is set
    data = load_dataset(cfg, seed=opened.run.trainer.seed)
    test = placed(data.test, opened.device)  # image files stream themselves
    result = evaluate(opened.model, test, opened.context(pipeline), opened.run.trainer.eval_batch_size,
                      opened.spec.num_classes)
    seconds = time.perf_counter() - tic

    classes = tuple(data.spec.classes)
    report.write_confusion(out, result.confusion, classes)
    summary = {
        "run": str(opened.run_dir),
        "checkpoint": str(opened.checkpoint),
        "checkpoint_epoch": opened.epoch,
        "model": opened.run.model.label(),
        "trained_on": opened.spec.name,
        "dataset": cfg.name,
        "dataset_config": dataclasses.asdict(cfg),
        "test_size": len(test),
        "loss_name": opened.run.loss.name,
        "loss": result.loss,
        "accuracy": result.acc,
        "device": str(opened.device),
        "eval_batch_size": opened.run.trainer.eval_batch_size,
        "seconds": round(seconds, 3),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": list(argv),
        "notes": list(opened.notes),
    }
    own = _run_test_score(opened)  # the run's own score, for comparison, when this is the same test
    if own is not None and not overrides and "dataset" not in args and own[0] == opened.checkpoint.stem:
        summary["run_test_acc"] = own[1]
    if classes != tuple(opened.spec.classes):
        summary["notes"].append(f"class names differ from the training data's ({', '.join(opened.spec.classes[:3])}, "
                                f"...); labels are compared by index")
    if drawing:
        layer, num_images, channels = drawing
        summary["feature_maps"] = viz.draw_feature_maps(out / "feature_maps.png", opened.model, layer,
                                                        head(test, num_images, opened.device), opened.context(pipeline),
                                                        classes, channels, opened.run.model.label())
    write_json(out / "eval_summary.json", summary)
    return summary, result, classes, out


def feature_map_settings(opened: OpenRun, args: dict[str, list[str]]) -> tuple[str, int, int] | None:
    """(layer, images, channels) when feature_maps=true, each checked as the run config checks it."""
    if not parse_value("feature_maps", last(args, "feature_maps", "false")):
        return None
    given = {k.split(".", 1)[1]: parse_value(k, v[-1]) for k, v in args.items() if k.startswith("viz.")}
    settings = typed_group("viz", {**dataclasses.asdict(opened.run.viz), **given, "feature_maps": True})
    return viz.resolve_layer(opened.model, settings.layer), settings.num_images, settings.channels


def _run_test_score(opened: OpenRun) -> tuple[str, float] | None:
    """(checkpoint name, test_acc) from the run's summary.json, if it has them."""
    try:
        saved = json.loads((opened.run_dir / "summary.json").read_text())
        return saved.get("test_checkpoint", "best"), float(saved["test_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_result(summary: dict[str, Any], result: Evaluation, classes: tuple[str, ...], out: Path) -> str:
    lines = [
        f"{summary['model']} (epoch {summary['checkpoint_epoch']}, {Path(summary['checkpoint']).name}) "
        f"on {summary['dataset']} test: {summary['test_size']} images, {summary['device']}, {summary['seconds']:.1f} s",
        f"  accuracy  {summary['accuracy']:.2%}"
        + (f"  (the run's summary.json: {summary['run_test_acc']:.2%})" if "run_test_acc" in summary else ""),
        f"  loss      {summary['loss']:.4f} ({summary['loss_name']})",
        report.per_class_text(result.confusion, classes),
    ]
    if "feature_maps" in summary:
        maps = summary["feature_maps"]
        lines.append(f"feature maps: {maps['panels']} images at {maps['layer']} ({maps['file']})")
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"files: {out.resolve()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = key_value_parser(PROG, "run=<run dir> [key=value ...]",
                              "Score a run's checkpoint on a test set: its own (by default) or another dataset of "
                              "the same image shape and class count. Writes confusion_matrix.csv/.png, "
                              "per_class_accuracy.csv and eval_summary.json; the run's own files are left as they are.",
                              KEYS)
    try:
        summary, result, classes, out = run_evaluation(parser.parse_args(argv).args, argv)
    except ConfigError as err:
        return fail(PROG, err)
    print(format_result(summary, result, classes, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
