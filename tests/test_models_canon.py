"""The classic families (alexnet, convnet5, cifarnet, nin, googlenet): exact sizes, shapes, the faithful
no-BN forms, and that each default model learns real Fashion-MNIST under the default SGD. CPU only."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.config import typed_group
from cnnlab.models import ModelConfig, available, build_model, count_parameters, schema_for
from cnnlab.models import googlenet as googlenet_module
from cnnlab.models.googlenet import Inception

CANON = ["alexnet", "alexnet_original", "cifarnet", "convnet5", "googlenet", "nin"]
ALEXNET_ORIGINAL_MIN = 63  # px: 11x11 stride-4 conv (pad 2) and three unpadded 3/2 max pools
PAPER_WIDTHS = [96, 256, 384, 384, 256]
TORCHVISION_WIDTHS = [64, 192, 384, 256, 256]
CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def make_cfg(name: str, **overrides) -> ModelConfig:
    node = OmegaConf.merge(OmegaConf.structured(schema_for(name)), {"name": name, **overrides})
    return OmegaConf.to_object(node)


def build(name: str, shape: tuple[int, int, int], num_classes: int = 10, **overrides) -> nn.Module:
    return build_model(make_cfg(name, **overrides), shape[0], num_classes, shape[1:])


def n_params(model: nn.Module) -> int:
    return count_parameters(model)[0]


def test_registered():
    assert set(CANON) <= set(available())


@pytest.mark.parametrize("name", CANON)
def test_shipped_config_is_the_schema_default(name):
    """conf/model/<name>.yaml lists every key of the schema, with the schema's default."""
    shipped = OmegaConf.to_container(OmegaConf.load(CONF_MODEL_DIR / f"{name}.yaml"))
    assert shipped == OmegaConf.to_container(OmegaConf.structured(schema_for(name)(name=name)))
    assert isinstance(typed_group("model", shipped), schema_for(name))


# ----------------------------------------------------------------------------------- sizes and shapes


def convnet5_formula(widths, in_channels, num_classes, size, batch_norm):
    """3x3 convs (bias only without BN, BN adds gamma+beta); each stride-1 2x2 pool drops 1 px."""
    total, c = 0, in_channels
    for w in widths:
        total += c * w * 9 + (2 * w if batch_norm else w)
        c = w
    side = size - len(widths)
    return total + c * side * side * num_classes + num_classes


def nin_formula(in_channels, num_classes, batch_norm):
    """The paper's table; every conv but the last has BN (or a bias); the last (logits) conv keeps its bias."""
    table = ((5, (192, 160, 96)), (5, (192, 192, 192)), (3, (192, 192, num_classes)))
    total, c = 0, in_channels
    for kernel, widths in table:
        for i, w in enumerate(widths):
            k = kernel if i == 0 else 1
            last = w == num_classes and kernel == 3 and i == 2
            total += c * w * k * k + (w if (last or not batch_norm) else 2 * w)
            c = w
    return total


@pytest.mark.parametrize("batch_norm", [True, False])
def test_convnet5_param_count(batch_norm):
    widths = [32, 32, 64, 64, 128]
    by_hand = convnet5_formula(widths, 3, 10, 32, batch_norm)
    # 3->32, 32->32, 32->64, 64->64, 64->128 convs, then Linear(128 * 27 * 27 -> 10).
    assert by_hand == (1_072_874 if batch_norm else 1_072_554)
    assert n_params(build("convnet5", (3, 32, 32), batch_norm=batch_norm)) == by_hand
    one_channel = build("convnet5", (1, 28, 28), batch_norm=batch_norm)
    assert n_params(one_channel) == convnet5_formula(widths, 1, 10, 28, batch_norm)
    custom = [8, 16]
    assert n_params(build("convnet5", (1, 28, 28), widths=custom)) == convnet5_formula(custom, 1, 10, 28, True)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_nin_param_count(batch_norm):
    by_hand = nin_formula(3, 10, batch_norm)
    assert by_hand == (968_394 if batch_norm else 966_986)
    assert n_params(build("nin", (3, 32, 32), batch_norm=batch_norm)) == by_hand
    hundred = build("nin", (1, 28, 28), num_classes=100, batch_norm=batch_norm)
    assert n_params(hundred) == nin_formula(1, 100, batch_norm)


def test_alexnet_original_param_counts():
    """The paper's widths (ungrouped) give the quoted 62.3M; torchvision's widths give torchvision's count."""
    with torch.device("meta"):  # shapes only: no 250 MB of weights to allocate and initialise
        paper = build("alexnet_original", (3, 224, 224), 1000, batch_norm=False)
        tv_widths = build(
            "alexnet_original", (3, 224, 224), 1000, widths=TORCHVISION_WIDTHS, lrn=False, batch_norm=False
        )
        with_bn = build("alexnet_original", (3, 224, 224), 1000)  # the default: BN adds gamma+beta, drops conv biases
    assert n_params(paper) == 62_378_344
    assert n_params(tv_widths) == 61_100_840
    assert n_params(with_bn) == 62_378_344 + sum(PAPER_WIDTHS)
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = torchvision.models.alexnet()
    # Same layer shapes as torchvision's, in the same order.
    assert [tuple(p.shape) for p in tv_widths.parameters()] == [tuple(p.shape) for p in reference.parameters()]


def test_alexnet_original_lrn_is_the_papers():
    model = build("alexnet_original", (3, 64, 64))
    lrns = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == 2
    # torch divides alpha by size; the paper's formula has alpha = 1e-4 without that division.
    assert all((m.size, m.alpha / m.size, m.beta, m.k) == (5, pytest.approx(1e-4), 0.75, 2.0) for m in lrns)
    without = build("alexnet_original", (3, 64, 64), lrn=False)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in without.modules())


@pytest.mark.parametrize("size", [28, 32, ALEXNET_ORIGINAL_MIN - 1])
def test_alexnet_original_too_small_names_minimum_and_the_way_out(size):
    with pytest.raises(ConfigError) as err:
        build("alexnet_original", (3, size, size))
    msg = str(err.value)
    assert f"{size}x{size}" in msg and f"minimum is {ALEXNET_ORIGINAL_MIN}x{ALEXNET_ORIGINAL_MIN}" in msg
    assert "model=alexnet" in msg and "resize" in msg


def test_convnet5_too_small_names_minimum():
    with pytest.raises(ConfigError, match="minimum is 6x6"):
        build("convnet5", (1, 5, 5))
    with pytest.raises(ConfigError, match="minimum is 3x3"):
        build("convnet5", (1, 2, 2), widths=[4, 4])
    assert build("convnet5", (1, 6, 6))(torch.zeros(2, 1, 6, 6)).shape == (2, 10)


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("alexnet", {"widths": [64, 192, 384, 256]}, "model.widths"),
        ("alexnet_original", {"widths": [96, 0, 384, 384, 256]}, "model.widths"),
        ("alexnet", {"classifier_width": 0}, "model.classifier_width"),
        ("convnet5", {"widths": []}, "model.widths"),
        ("cifarnet", {"widths": [64, -1]}, "model.widths"),
        ("nin", {"dropout": 1.0}, "model.dropout"),
        ("googlenet", {"activation": "softplus"}, "model.activation"),
    ],
)
def test_invalid_values_name_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model(make_cfg(name, **overrides), 3, 10, (64, 64))


@pytest.mark.parametrize("name", CANON)
def test_batch_norm_false_is_the_plain_form(name):
    """No norm layers, every conv has a bias; with BN no conv has one (BN's shift replaces it) but NiN's logits conv."""
    shape = (3, 64, 64)
    plain = build(name, shape, batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    normed = build(name, shape, batch_norm=True)
    convs = [m for m in normed.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == len(convs) - (name == "nin")
    assert [m.bias is not None for m in convs] == [name == "nin" and m is convs[-1] for m in convs]


@pytest.mark.parametrize("name", CANON)
def test_pytorch_default_init_leaves_every_norm_at_one(name):
    """The families' zero_init_last() belongs to init=kaiming; pytorch_default must not run it."""
    shape = (3, 64, 64)
    model = build(name, shape, init="pytorch_default")
    assert all((m.weight == 1).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    kaiming = build(name, shape)
    gammas = [m.weight for m in kaiming.modules() if isinstance(m, nn.BatchNorm2d)]
    if name in ("alexnet", "alexnet_original", "cifarnet", "convnet5"):
        assert (gammas[-1] < 1).all() and (gammas[-1] > 0).all()  # shrunk, not zero: ReLU(0) has no gradient
    if name == "nin":
        last_conv = [m for m in kaiming.modules() if isinstance(m, nn.Conv2d)][-1]
        # the logits conv starts near 0, as every head: N(0, 0.01), bias 0
        assert 0.005 < last_conv.weight.std().item() < 0.015 and (last_conv.bias == 0).all()
        assert last_conv.out_channels == 10


def test_googlenet_inception_channels_follow_the_table():
    table = googlenet_module.ARCHS["googlenet"]
    model = build("googlenet", (3, 32, 32))
    blocks = [m for m in model.modules() if isinstance(m, Inception)]
    rows = [row for stage in table for row in stage]
    assert len(blocks) == len(rows) == 9
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.shape[1])) for b in blocks]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 8, 8))
    for h in hooks:
        h.remove()
    for block, (c1, (_, c2b), (_, c3b), c4), seen in zip(blocks, rows, outputs):
        assert block.out_channels == seen == c1 + c2b + c3b + c4
    assert outputs[-1] == model.classifier[-1].in_features == 1024


def test_nin_last_conv_is_linear_logits():
    model = build("nin", (3, 32, 32))
    last = model.features[-1]
    assert isinstance(last[-1], nn.Conv2d) and last[-1].out_channels == 10  # no act/BN after it: logits can be < 0
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
