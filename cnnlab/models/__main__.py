"""`python -m cnnlab.models` / `cnnlab models`: every model with its size and compute for a dataset,
or one model's card, configured with the training command line's overrides.

    cnnlab models --dataset cifar10                        # table sorted by parameters
    cnnlab models --dataset cifar10 --near alexnet         # closest in size to AlexNet first
    cnnlab models model=vgg11 'model.arch=[[1,64],[2,128]]' --dataset cifar10   # that model's card
    cnnlab models model=custom model._target_=mynet.TinyVGG +model.width=64     # your own model's card
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from cnnlab.checks import ConfigError
from cnnlab.cli import Parser, fail
from cnnlab.config import model_defaults, offer_registered_models, typed_group, validate
from cnnlab.data import available as datasets
from cnnlab.data import spec_for
from cnnlab.models import build_model, family, zoo
from cnnlab.models.card import human, model_card

PROG = "cnnlab models"
OPTIONS = ("--dataset", "--sort", "--near", "--family", "--csv", "model=")  # for shell completion
SORT_KEYS = ("params", "flops", "name")


def model_table(dataset: str) -> pd.DataFrame:
    """One row per registered model, built with its shipped defaults for `dataset`'s images."""
    spec = spec_for(typed_group("dataset", {"name": dataset}))
    shape = (spec.channels, spec.height, spec.width)
    rows = []
    for name in zoo():
        try:
            model = build_model(model_defaults(name), spec.channels, spec.num_classes, shape[1:])
        except ConfigError as err:  # e.g. alexnet_original needs larger images
            rows.append({"model": name, "family": family(name), "note": str(err).split(". ")[0]})
            continue
        card = model_card(model, name, shape, spec.num_classes)
        rows.append({
            "model": name,
            "family": family(name),
            "params": card.params_total,
            "size_mb": card.model_size_mb,
            "macs": card.macs_per_image,
            "flops": card.flops_per_image,
            "vs_reference": _versus(card.reference),
            "note": "",
        })
    table = pd.DataFrame(rows)
    return table.astype({"params": "Int64", "macs": "Int64", "flops": "Int64"})  # counts stay integers in CSV


def _versus(reference: dict | None) -> str:
    """'7.3% of AlexNet original (62.4M)': the card's comparison, short enough for a table."""
    if not reference:
        return ""
    return f"{reference['ratio']:.1%} of {reference['name'].split(' (')[0]} ({human(reference['params'])})"


def format_table(table: pd.DataFrame) -> str:
    shown = table.astype(object)
    for column in ("params", "macs", "flops"):
        shown[column] = [human(v) if pd.notna(v) else "-" for v in shown[column]]
    shown["size_mb"] = [f"{v:.2f}" if pd.notna(v) else "-" for v in shown["size_mb"]]
    if "vs_near" in shown:
        shown["vs_near"] = [f"{v:.2f}x" if pd.notna(v) else "-" for v in shown["vs_near"]]
    return shown.fillna("").to_markdown(index=False)


def card_text(overrides: list[str]) -> str:
    """The model card of the model these training overrides configure, built for their dataset."""
    from cnnlab.build import prepare  # the training build: exactly the model a run would train
    from cnnlab.precheck import compose_job

    offer_registered_models(overrides)
    run = validate(compose_job(overrides))
    prep = prepare(run, training=False)
    return model_card(prep.model, run.model.label(), prep.pipeline.output_shape, prep.spec.num_classes,
                      run.model.is_standard_form()).text()


def ranked(table: pd.DataFrame, sort: str, near: str | None, only: str | None) -> pd.DataFrame:
    """The table sorted, or ordered by the ratio of parameter counts to `near`'s; `only`: one family."""
    if near:
        target = table.loc[table["model"] == near, "params"].iloc[0]
        if pd.isna(target):
            raise ConfigError("that model does not build")
        table = table.assign(vs_near=table["params"] / target)
        distance = np.abs(np.log(table["vs_near"].astype(float)))  # 2x bigger is as near as 2x smaller
        table = table.iloc[distance.argsort(kind="stable")]
    else:
        table = table.sort_values(sort, kind="stable", na_position="last")
    return table[table["family"] == only] if only else table


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="training overrides (model=vgg11 model.dropout=0.3 ...): print that model's card")
    parser.add_argument("--dataset", default=None, choices=datasets(),
                        help="size the models for this dataset's images and classes (default: cifar10; with "
                             "overrides: the training default, or dataset=... among them)")
    parser.add_argument("--sort", default="params", choices=SORT_KEYS, help="sort order (default: params)")
    parser.add_argument("--near", metavar="MODEL", choices=zoo(),
                        help="sort by closeness in parameter count to this model, as a ratio (2x and 0.5x are as near)")
    parser.add_argument("--family", choices=sorted({family(n) for n in zoo()}),
                        help="only this family's models, e.g. --family vgg --near alexnet")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    try:
        args = parser.parse_intermixed_args(argv)
    except ConfigError as err:
        return fail(PROG, err)
    if args.overrides:
        try:
            print(card_text(args.overrides + ([f"dataset={args.dataset}"] if args.dataset else [])), end="")
        except ConfigError as err:
            return fail(PROG, err)
        return 0
    args.dataset = args.dataset or "cifar10"
    try:
        table = model_table(args.dataset)
    except ConfigError as err:  # image_folder takes its shape from files: it needs a dataset.root to list for
        return fail(PROG, f"--dataset {args.dataset} cannot be sized without its files ({err}); "
                          "list the models for a built-in dataset of the same image size instead")
    try:
        table = ranked(table, args.sort, args.near, args.family)
    except ConfigError as err:
        return fail(PROG, f"--near {args.near}: {err} for {args.dataset}")
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(f"models for {args.dataset} (defaults from conf/model; MACs and FLOPs per image)\n")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
