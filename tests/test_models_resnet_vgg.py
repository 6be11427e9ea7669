"""ResNet and VGG extensions: published parameter counts, stems, Bottleneck, option-A shortcuts, the
new names (resnet11/20/26/50, vgg_tiny), the no-BN form, shipped yamls, and a short trainability check."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.models import ModelConfig, available, build_model, count_parameters, schema_for
from cnnlab.models.resnet import ARCHS, Bottleneck, PadShortcut, ResNet

from test_models import forward_backward

NEW_NAMES = ["resnet11", "resnet20", "resnet26", "resnet50", "vgg_tiny"]
CONF_MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def make_cfg(name: str, **overrides) -> ModelConfig:
    """As config code does it: structured schema merged with the user's keys, then to_object."""
    node = OmegaConf.merge(OmegaConf.structured(schema_for(name)), {"name": name, **overrides})
    return OmegaConf.to_object(node)


def n_params(model: nn.Module) -> int:
    return count_parameters(model)[0]


def test_new_names_registered():
    assert set(NEW_NAMES) <= set(available())
    assert {"resnet18", "resnet34", "vgg11", "vgg13", "vgg16", "vgg19"} <= set(available())


# Counts only: built on the meta device, so no memory or init time for 138M parameters.
@pytest.mark.parametrize("name, published", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_imagenet_stem_matches_torchvision_count(name, published):
    with torch.device("meta"):
        ours = build_model(make_cfg(name, stem="imagenet"), 3, 1000, (224, 224))
        reference = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == n_params(reference) == published


@pytest.mark.parametrize("name, published", [("vgg16", 138_357_544), ("vgg11", 132_863_336)])
def test_vgg_original_head_matches_torchvision_count(name, published):
    cfg = make_cfg(name, pool_size=7, classifier_width=4096, batch_norm=False)
    with torch.device("meta"):
        ours = build_model(cfg, 3, 1000, (224, 224))
        reference = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == n_params(reference) == published
    assert ours.classifier[1].in_features == 512 * 7 * 7


def test_resnet20_has_the_papers_count():
    def conv_bn(c_in, c_out):  # 3x3 conv without bias, BN gamma + beta
        return c_in * c_out * 9 + 2 * c_out

    by_hand = conv_bn(3, 16)  # stem
    by_hand += 3 * 2 * conv_bn(16, 16)  # stage 1: 3 blocks of two convs
    by_hand += conv_bn(16, 32) + 5 * conv_bn(32, 32)  # stage 2; option-A shortcuts have no parameters
    by_hand += conv_bn(32, 64) + 5 * conv_bn(64, 64)  # stage 3
    by_hand += 64 * 10 + 10  # head
    assert by_hand == 269_722  # the paper's "0.27M"
    model = build_model(make_cfg("resnet20"), 3, 10, (32, 32))
    assert count_parameters(model) == (by_hand, by_hand)
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2  # the two stage transitions
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)  # ceil(7 / 2), as the stride-2 3x3 conv with padding 1
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and (out[:, 16:] == 0).all()


@pytest.mark.parametrize("size, stem_px, last_px", [(224, 56, 7), (64, 16, 2)])
def test_imagenet_stem_output_shape(size, stem_px, last_px):
    model = build_model(make_cfg("resnet18", stem="imagenet"), 3, 1000, (size, size)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        stem_out = model.stem(x)
        assert stem_out.shape == (1, 64, stem_px, stem_px)  # conv /2 then max pool /2
        assert model.stages(stem_out).shape == (1, 512, last_px, last_px)
        assert model(x).shape == (1, 1000)
    kinds = [type(m) for m in model.stem]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert model.stem[0].kernel_size == (7, 7) and model.stem[0].stride == (2, 2)


def test_bottleneck_shape_and_stride_on_3x3():
    block = Bottleneck(64, 32, stride=2, activation="relu", batch_norm=True)
    assert block(torch.randn(2, 64, 9, 9)).shape == (2, 4 * 32, 5, 5)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    assert build_model(make_cfg("resnet50"), 3, 10, (32, 32)).fc.in_features == 4 * 512
    model = build_model(make_cfg("resnet26"), 3, 10, (32, 32))
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 8 and all((b.bn3.weight == 0).all() and (b.bn2.weight == 1).all() for b in blocks)


def test_resnet20_keeps_plain_he_init():
    model = build_model(make_cfg("resnet20"), 3, 10, (32, 32))
    assert all((m.weight == 1).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_pytorch_default_leaves_torch_init():
    torch.manual_seed(0)
    built = build_model(make_cfg("resnet26", init="pytorch_default", stem="imagenet"), 3, 10, (32, 32))
    torch.manual_seed(0)
    plain = ResNet(ARCHS["resnet26"], 3, 10, stem="imagenet")
    for (k, a), b in zip(built.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "name, overrides",
    [(n, {}) for n in NEW_NAMES]
    + [("resnet18", {"stem": "imagenet"}), ("resnet50", {"stem": "imagenet"}), ("vgg16", {"pool_size": 7})],
)
def test_no_batch_norm_form(name, overrides):
    model = build_model(make_cfg(name, batch_norm=False, **overrides), 3, 10, (32, 32))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None for m in convs)
    if name in ("resnet20", "vgg_tiny"):  # the cheap ones also run
        forward_backward(model, (3, 32, 32))


def test_vgg_pool_size_sets_classifier_input():
    model = build_model(make_cfg("vgg_tiny", pool_size=3), 1, 10, (28, 28))
    assert model.classifier[1].in_features == 64 * 3 * 3
    forward_backward(model, (1, 28, 28))


@pytest.mark.parametrize(
    "name, overrides, key, valid",
    [
        ("resnet18", {"stem": "bad"}, "model.stem", "cifar, imagenet"),
        ("resnet20", {"stem": "ImageNet"}, "model.stem", "cifar, imagenet"),
        ("vgg_tiny", {"pool_size": 0}, "model.pool_size", ">= 1"),
    ],
)
def test_invalid_values_raise_config_error(name, overrides, key, valid):
    with pytest.raises(ConfigError) as err:
        build_model(make_cfg(name, **overrides), 3, 10, (32, 32))
    assert key in str(err.value) and valid in str(err.value)


@pytest.mark.parametrize("name", NEW_NAMES + ["resnet18", "resnet34", "vgg11", "vgg13", "vgg16", "vgg19"])
def test_yaml_lists_every_key_with_its_default(name):
    shipped = OmegaConf.to_container(OmegaConf.load(CONF_MODEL_DIR / f"{name}.yaml"))
    defaults = {f.name: f.default for f in dataclasses.fields(schema_for(name))}
    assert set(shipped) == set(defaults)
    assert shipped == {**defaults, "name": name}
