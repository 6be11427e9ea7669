"""Model cards, the model listing and feature-map pictures."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from cnnlab.checks import ConfigError
from cnnlab.config import model_defaults, typed_group, validate
from cnnlab.models import build_model, zoo
from cnnlab.models.__main__ import model_table
from cnnlab.models.card import REFERENCES, model_card
from cnnlab.build import prepare
from cnnlab.viz import plot_feature_maps

from conftest import compose_config, run_cnnlab
from test_run import check_run_dir


def test_lenet_card_matches_hand_counts():
    model = build_model(model_defaults("lenet"), 1, 10, (28, 28))
    card = model_card(model, "lenet", (1, 28, 28), 10)
    # conv1 (6*1*25 + 6) weights+biases at 28x28, conv2 (16*6*25 + 16) at 10x10, then the three linears
    linears = [(400, 120), (120, 84), (84, 10)]
    params = (6 * 25 + 6) + (16 * 6 * 25 + 16) + sum(i * o + o for i, o in linears)
    macs = (6 * 25 + 6) * 28 * 28 + (16 * 6 * 25 + 16) * 10 * 10 + sum(i * o + o for i, o in linears)
    assert card.params_total == card.params_trainable == params == 61_706
    assert card.macs_per_image == macs and card.flops_per_image == 2 * macs
    assert card.model_size_mb == pytest.approx(params * 4 / 1e6)
    assert card.reference["ratio"] == pytest.approx(1.0)
    assert "Conv2d (0)" in card.table and "[1, 16, 10, 10]" in card.table and "Param #" in card.table
    text = card.text()
    assert "61,706 total" in text and "MACs" in text and "reference: LeNet-5" in text


def test_carding_changes_neither_rng_nor_batchnorm_statistics():
    model = build_model(model_defaults("resnet18"), 3, 10, (32, 32))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model_card(model, "resnet18", (3, 32, 32), 10)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name,builder", [
    ("vgg11", lambda: torchvision.models.vgg11()),
    ("vgg13", lambda: torchvision.models.vgg13()),
    ("vgg16", lambda: torchvision.models.vgg16()),
    ("vgg19", lambda: torchvision.models.vgg19()),
    ("resnet18", lambda: torchvision.models.resnet18()),
    ("resnet34", lambda: torchvision.models.resnet34()),
    ("resnet50", lambda: torchvision.models.resnet50()),
    ("googlenet", lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False)),
])
def test_reference_counts_are_torchvisions(name, builder):
    assert REFERENCES[name][1] == sum(p.numel() for p in builder().parameters())


def test_card_compares_with_the_original_alexnet():
    model = build_model(model_defaults("alexnet"), 3, 10, (32, 32))
    card = model_card(model, "alexnet", (3, 32, 32), 10)
    assert card.reference["params"] == 62_378_344
    assert card.reference["ratio"] == pytest.approx(card.params_total / 62_378_344)
    assert card.reference_line.startswith("AlexNet original (Krizhevsky et al. 2012): 62.4M; this model: ")
    assert card.reference_line.endswith(f"{card.params_total / 62_378_344:.1%}")


def test_model_table_lists_every_model_with_its_real_counts():
    table = model_table("cifar10").set_index("model")
    assert sorted(table.index) == zoo()
    for name in ("lenet", "vgg11", "resnet18"):
        model = build_model(model_defaults(name), 3, 10, (32, 32))
        assert table.loc[name, "params"] == sum(p.numel() for p in model.parameters())
        assert table.loc[name, "flops"] == 2 * table.loc[name, "macs"] > 0
    # a model that needs larger images says so instead of a number
    assert pd.isna(table.loc["alexnet_original", "params"])
    assert "minimum" in table.loc["alexnet_original", "note"]


def test_models_command_writes_a_csv_and_sorts_by_closeness(tmp_path):
    csv = tmp_path / "models.csv"
    result = subprocess.run([sys.executable, "-m", "cnnlab", "models", "--dataset", "mnist", "--near", "alexnet",
                             "--csv", str(csv)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| alexnet" in result.stdout
    table = pd.read_csv(csv)
    assert sorted(table["model"]) == zoo()
    assert table["model"].iloc[0] == "alexnet" and table["vs_near"].iloc[0] == pytest.approx(1.0)
    distance = np.abs(np.log(table["vs_near"].dropna().astype(float)))  # by ratio: 2x as near as 0.5x
    assert distance.is_monotonic_increasing
    bad = subprocess.run([sys.executable, "-m", "cnnlab.models", "--dataset", "imagenet"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cifar10" in bad.stderr  # lists the valid datasets


def test_feature_map_figure_has_one_panel_per_image(tmp_path):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    activations = torch.randn(6, 20, 4, 4)
    panels = plot_feature_maps(tmp_path / "fm.png", images, activations, [0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0],
                               [f"c{i}" for i in range(10)], channels=15, title="t")
    assert panels == 6
    assert (tmp_path / "fm.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_feature_map_layer_lists_the_conv_layers():
    run = validate(compose_config("viz.feature_maps=true", "viz.layer=classifier.1", "trainer.device=cpu"))
    with pytest.raises(ConfigError) as info:
        prepare(run)
    assert "viz.layer" in str(info.value) and "features.0" in str(info.value) and "features.4" in str(info.value)


def test_run_writes_model_card_and_feature_maps(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cnnlab("+debug=smoke", "model=vgg_tiny", "viz.feature_maps=true", "viz.num_images=5",
                        "viz.channels=7", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(run_dir, epochs=2, test_size=128)
    fm = summary["feature_maps"]
    assert fm["panels"] == 5 and len(fm["predicted"]) == len(fm["true"]) == 5
    assert fm["channels_shown"] == 7 and fm["layer"].startswith("features.")
    assert (run_dir / "feature_maps.png").read_bytes()[:4] == b"\x89PNG"
    # the true classes shown are the first test images'
    confusion_total = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0).to_numpy().sum()
    assert confusion_total == 128
    assert json.loads((run_dir / "summary.json").read_text())["macs_per_image"] > 0


@pytest.mark.parametrize(("shape", "params"), [((1, 28, 28), 61_706), ((3, 32, 32), 62_006)])
def test_the_papers_lenet_and_its_reference(shape, params):
    """The homework's LeNet: no padding at 32 px (6 5x5x3 kernels take 32x32 to 28x28x6, 400 features)."""
    model = build_model(model_defaults("lenet"), shape[0], 10, shape[1:])
    card = model_card(model, "lenet", shape, 10)
    assert card.params_total == params and card.reference["params"] == params
    assert "[1, 6, 28, 28]" in card.table and "[1, 400]" in card.table
    assert card.reference_line.startswith(f"LeNet-5 (LeCun et al. 1998, 32x32 input, {shape[0]} channel")


@pytest.mark.parametrize(("padding", "side", "features"), [("same", 32, 6 * 6), ("valid", 28, 4 * 4), (1, 30, 5 * 5)])
def test_lenet_padding_key(padding, side, features):
    cfg = typed_group("model", {"name": "lenet", "padding": padding})
    model = build_model(cfg, 1, 10, (side, side))
    assert model.classifier[1].in_features == 16 * features


def test_lenet_padding_is_checked_and_small_inputs_name_their_minimum():
    with pytest.raises(ConfigError, match=r"model.padding='half' is not valid; choose one of: auto, same, valid"):
        typed_group("model", {"name": "lenet", "padding": "half"})
    with pytest.raises(ConfigError, match="minimum is 16x16"):
        build_model(typed_group("model", {"name": "lenet", "padding": "valid"}), 1, 10, (15, 15))


def test_a_custom_arch_is_not_compared_with_the_original():
    cfg = typed_group("model", {"name": "vgg11", "arch": [[1, 16], [1, 32]]})
    shape = (3, 32, 32)
    card = model_card(build_model(cfg, 3, 10, shape[1:]), "vgg11", shape, 10, cfg.is_standard_form())
    assert card.reference is None and "reference" not in card.text()
    assert model_defaults("vgg11").is_standard_form() and not typed_group(
        "model", {"name": "alexnet", "widths": [8, 8, 8, 8, 8]}).is_standard_form()


def test_models_near_ranks_within_a_family(tmp_path):
    csv = tmp_path / "near.csv"
    result = subprocess.run([sys.executable, "-m", "cnnlab", "models", "--near", "alexnet", "--family", "vgg",
                             "--csv", str(csv)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(csv)
    assert set(table["family"]) == {"vgg"} and "vgg_tiny" in set(table["model"])
    ratios = np.abs(np.log(table["vs_near"]))
    assert ratios.is_monotonic_increasing


def test_models_prints_a_card_for_overrides():
    result = subprocess.run([sys.executable, "-m", "cnnlab", "models", "model=vgg11", "model.arch=[[1,64],[1,128],[2,256]]",
                             "--dataset", "cifar10"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: vgg11    input: 3x32x32    classes: 10")
    model = build_model(typed_group("model", {"name": "vgg11", "arch": [[1, 64], [1, 128], [2, 256]]}), 3, 10, (32, 32))
    assert f"params: {sum(p.numel() for p in model.parameters()):,} total" in result.stdout
    assert "reference:" not in result.stdout
    bad = subprocess.run([sys.executable, "-m", "cnnlab", "models", "model=vgg11", "model.arch=oops"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model.arch" in bad.stderr and "Traceback" not in bad.stderr
