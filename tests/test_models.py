"""Model registry and families: shapes, gradients, parameter counts, validation, init. CPU only, fast."""
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.config import typed_group
from cnnlab.models import (
    ModelConfig,
    available,
    build_model,
    count_parameters,
    schema_for,
    zoo,
)
from cnnlab.models.layers import ACTIVATIONS, make_activation
from cnnlab.models.lenet import LeNet, LeNetConfig
from cnnlab.models.resnet import ResNetConfig
from cnnlab.models.vgg import VGGConfig

CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def make_cfg(name: str, **overrides) -> ModelConfig:
    """The path config code takes: structured schema merged with the user's keys, then to_object."""
    node = OmegaConf.merge(OmegaConf.structured(schema_for(name)), {"name": name, **overrides})
    return OmegaConf.to_object(node)


def forward_backward(model: nn.Module, shape: tuple[int, int, int], num_classes: int = 10) -> None:
    model.train()
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, num_classes - 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


def test_registry_names():
    assert zoo() == [
        "alexnet", "alexnet_original", "cifarnet", "convnet5", "googlenet", "lenet", "nin",
        "resnet11", "resnet18", "resnet20", "resnet26", "resnet34", "resnet50",
        "vgg11", "vgg13", "vgg16", "vgg19", "vgg_tiny",
    ]
    assert available() == sorted([*zoo(), "custom"])  # model=custom: the user's own, by model._target_
    assert schema_for("lenet") is LeNetConfig
    assert schema_for("vgg16") is VGGConfig
    assert schema_for("resnet34") is ResNetConfig


# Models meant for large images only; below this side length they must refuse with a clear error.
MIN_SIDE = {"alexnet_original": 63}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)], ids=["1x28x28", "3x32x32", "3x64x64"])
@pytest.mark.parametrize("name", zoo())
def test_every_model_forward_backward(name, shape):
    torch.manual_seed(0)
    side = MIN_SIDE.get(name, 1)
    if shape[1] < side:
        with pytest.raises(ConfigError, match=f"minimum is {side}x{side}"):
            build_model(make_cfg(name), in_channels=shape[0], num_classes=10, input_size=shape[1:])
        return
    model = build_model(make_cfg(name), in_channels=shape[0], num_classes=10, input_size=shape[1:])
    # no lazy modules: the parameter count is final before any forward pass
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
    count = sum(p.numel() for p in model.parameters())
    forward_backward(model, shape)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_every_activation(name, activation):
    torch.manual_seed(0)
    shape = (1, 16, 16)  # small but above lenet's 12-px minimum
    model = build_model(make_cfg(name, activation=activation), shape[0], 10, shape[1:])
    forward_backward(model, shape)


def test_swish_is_silu_and_leaky_slope():
    assert isinstance(make_activation("swish"), nn.SiLU)
    assert make_activation("leaky_relu").negative_slope == 0.01


def vgg_param_formula(arch, in_channels, num_classes, width=512, batch_norm=True):
    """Independent count: 3x3 convs (bias only without BN; BN adds gamma+beta), then the 3-layer MLP."""
    total, c = 0, in_channels
    for num_convs, channels in arch:
        for _ in range(num_convs):
            total += c * channels * 9 + (2 * channels if batch_norm else channels)
            c = channels
    return total + (c * width + width) + (width * width + width) + (width * num_classes + num_classes)


def test_custom_vgg_arch_param_count():
    cfg = make_cfg("vgg11", arch=[[1, 16], [1, 32]])
    model = build_model(cfg, in_channels=1, num_classes=10, input_size=(28, 28))
    by_hand = (
        (1 * 16 * 9 + 2 * 16)  # conv 1->16, no bias under BN, BN gamma+beta
        + (16 * 32 * 9 + 2 * 32)  # conv 16->32 + BN
        + (32 * 512 + 512)  # Linear 32->512 (after global average pooling)
        + (512 * 512 + 512)
        + (512 * 10 + 10)
    )
    assert by_hand == 289_530
    assert count_parameters(model) == (by_hand, by_hand)
    forward_backward(model, (1, 28, 28))


def test_d2l_style_tuple_arch():
    arch = ((1, 8), (2, 16))
    model = build_model(VGGConfig(name="vgg13", arch=arch), 3, 10, (32, 32))
    assert count_parameters(model)[0] == vgg_param_formula(arch, 3, 10)
    assert make_cfg("vgg11", arch=arch).arch == [[1, 8], [2, 16]]  # OmegaConf takes tuples too


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg11_param_count(batch_norm):
    vgg11 = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    model = build_model(make_cfg("vgg11", batch_norm=batch_norm), 3, 10, (32, 32))
    expected = vgg_param_formula(vgg11, 3, 10, batch_norm=batch_norm)
    assert count_parameters(model) == (expected, expected)


def test_vgg_skips_pool_on_small_inputs():
    model = build_model(make_cfg("vgg11"), 1, 10, (28, 28))
    pools = [m for m in model.features.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4  # 28 -> 14 -> 7 -> 3 -> 1; the fifth stage has nothing left to pool
    assert build_model(make_cfg("vgg11"), 1, 10, (32, 32)).features[4][-1].__class__ is nn.MaxPool2d


def test_count_parameters_matches_and_counts_frozen():
    model = build_model(make_cfg("lenet"), 1, 10, (28, 28))
    n = sum(p.numel() for p in model.parameters())
    assert n == 61_706  # the classic LeNet-5 count
    assert count_parameters(model) == (n, n)
    for p in model.features.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.features.parameters())
    assert count_parameters(model) == (n, n - frozen)


@pytest.mark.parametrize("overrides", [{"kernel_size": 3}, {"pool": "avg"}, {"kernel_size": 3, "pool": "avg", "batch_norm": True}])
def test_lenet_variants(overrides):
    model = build_model(make_cfg("lenet", **overrides), 1, 10, (28, 28))
    forward_backward(model, (1, 28, 28))
    if overrides.get("pool") == "avg":
        assert any(isinstance(m, nn.AvgPool2d) for m in model.modules())


@pytest.mark.parametrize(
    "name, overrides, key, valid",
    [
        ("lenet", {"kernel_size": 4}, "model.kernel_size", "5, 3"),
        ("lenet", {"pool": "median"}, "model.pool", "max, avg"),
        ("lenet", {"activation": "softplus"}, "model.activation", "relu, leaky_relu, sigmoid, tanh, silu, swish, gelu"),
        ("lenet", {"dropout": 1.0}, "model.dropout", "[0.0, 1.0)"),
        ("resnet18", {"dropout": -0.1}, "model.dropout", "[0.0, 1.0)"),
        ("resnet18", {"init": "xavier"}, "model.init", "kaiming, pytorch_default"),
        ("vgg11", {"arch": [[1, 64], [0, 128]]}, "model.arch", "[num_convs, channels]"),
        ("vgg11", {"arch": []}, "model.arch", "[num_convs, channels]"),
        ("vgg11", {"arch": [[1, 64, 3]]}, "model.arch", "[num_convs, channels]"),
        ("vgg11", {"arch": [[1.5, 64]]}, "model.arch", "[num_convs, channels]"),
        ("vgg11", {"classifier_width": 0}, "model.classifier_width", ">= 1"),
    ],
)
def test_invalid_values_raise_config_error(name, overrides, key, valid):
    cfg = make_cfg(name, **overrides)  # types are fine, so the merge passes; validate must catch it
    with pytest.raises(ConfigError) as err:
        build_model(cfg, 1, 10, (28, 28))
    assert key in str(err.value) and valid in str(err.value)


def test_unknown_model_name():
    for call in (lambda: schema_for("vgg99"), lambda: build_model(ModelConfig(name="vgg99"), 3, 10, (32, 32))):
        with pytest.raises(ConfigError) as err:
            call()
        assert "model.name" in str(err.value) and "lenet, nin, resnet11, resnet18" in str(err.value)


def test_model_config_helper_wraps_omegaconf_errors():
    assert typed_group("model", {"name": "lenet", "kernel_size": 3}).kernel_size == 3
    with pytest.raises(ConfigError, match="model.kernel_size"):
        typed_group("model", {"name": "lenet", "kernel_size": "abc"})
    with pytest.raises(ConfigError, match="model.depth"):
        typed_group("model", {"name": "resnet18", "depth": 50})


@pytest.mark.parametrize("path", sorted(CONF_MODEL_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_model_configs_validate(path):
    node = OmegaConf.load(path)
    if path.stem == "custom":  # a slot: it names no model until model._target_ does
        with pytest.raises(ConfigError, match=r"model=custom needs model._target_=<module.Class>"):
            typed_group("model", node)
        node._target_ = "user_modules.Net"
    cfg = typed_group("model", node)
    assert isinstance(cfg, schema_for(cfg.name)) and cfg.name == path.stem


def test_too_small_input_names_minimum():
    with pytest.raises(ConfigError, match="12x12"):
        build_model(make_cfg("lenet"), 1, 10, (4, 4))
    with pytest.raises(ConfigError, match="8x8"):
        build_model(make_cfg("lenet", kernel_size=3), 1, 10, (7, 7))
    # Exactly the minimum works.
    forward_backward(build_model(make_cfg("lenet"), 1, 10, (12, 12)), (1, 12, 12))
    forward_backward(build_model(make_cfg("lenet", kernel_size=3), 1, 10, (8, 8)), (1, 8, 8))
    with pytest.raises(ConfigError, match="input_size"):
        build_model(make_cfg("vgg11"), 1, 10, (0, 28))


def test_kaiming_init_is_applied():
    arch = [[1, 16], [2, 32]]
    torch.manual_seed(0)
    kaiming = build_model(make_cfg("vgg11", arch=arch, init="kaiming"), 3, 10, (32, 32))
    torch.manual_seed(0)
    default = build_model(make_cfg("vgg11", arch=arch, init="pytorch_default"), 3, 10, (32, 32))
    w_k, w_d = kaiming.features[1][3].weight, default.features[1][3].weight  # the 32->32 conv
    assert w_k.shape == (32, 32, 3, 3)
    assert w_k.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)  # He, fan_out
    assert w_d.std().item() == pytest.approx(1 / math.sqrt(32 * 9) / math.sqrt(3), rel=0.1)  # torch's U(+-1/sqrt(fan_in))
    assert kaiming.classifier[-1].weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert all((m.bias == 0).all() for m in kaiming.modules() if isinstance(m, nn.Linear))


def test_xavier_for_saturating_activations():
    torch.manual_seed(0)
    model = build_model(make_cfg("vgg11", arch=[[1, 64]], activation="tanh", batch_norm=False), 64, 10, (8, 8))
    w = model.features[0][0].weight
    assert w.std().item() == pytest.approx(5 / 3 * math.sqrt(2 / (64 * 9 + 64 * 9)), rel=0.1)
    assert (model.features[0][0].bias == 0).all()


def test_pytorch_default_leaves_torch_init():
    torch.manual_seed(0)
    built = build_model(make_cfg("lenet", init="pytorch_default"), 1, 10, (28, 28))
    torch.manual_seed(0)
    plain = LeNet(1, 10, (28, 28))
    for (k, a), b in zip(built.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


def test_resnet_zero_inits_last_bn_of_each_block():
    model = build_model(make_cfg("resnet18"), 3, 10, (32, 32))
    blocks = [m for m in model.modules() if hasattr(m, "zero_init_last")]
    assert len(blocks) == 8
    assert all((b.bn2.weight == 0).all() and (b.bn1.weight == 1).all() for b in blocks)
    no_bn = build_model(make_cfg("resnet18", batch_norm=False), 3, 10, (32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Conv2d))
    forward_backward(no_bn, (3, 32, 32))
