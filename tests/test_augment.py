"""Batched augmentation: shapes, exact crop/flip semantics, eval determinism, config errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cnnlab.checks import ConfigError
from cnnlab.data import OPS, AugmentationConfig, DatasetSpec, Pipeline, build_pipeline
from cnnlab.data.augment import Op, Param, register_op, rotate, unregister_op, whole


def spec(channels=3, size=32, mean=None, std=None, h=None) -> DatasetSpec:
    return DatasetSpec(
        name=f"test{channels}x{size}",
        classes=tuple("abcdefghij"),
        channels=channels,
        height=h or size,
        width=size,
        mean=tuple(mean or [0.4, 0.5, 0.6][:channels] * (channels // 3 or 1)),
        std=tuple(std or [0.2, 0.25, 0.3][:channels] * (channels // 3 or 1)),
    )


def pipe(ops, s) -> Pipeline:
    cfg = AugmentationConfig(ops=ops)
    cfg.validate()
    return build_pipeline(cfg, s)


def images(b, s: DatasetSpec, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s.channels, s.height, s.width), generator=g, dtype=torch.uint8)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SPECS = [spec(3, 32), spec(1, 28), spec(1, 20, h=12)]  # colour, gray, non-square
SPEC_IDS = ["rgb32", "gray28", "gray12x20"]


# ------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("s", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("op,expect", [
    ("random_crop", None), ("hflip", None), ("vflip", None), ("color_jitter", None),
    ("rotation", None), ("normalize", None),
    ({"op": "normalize", "stats": "half"}, None),
    ({"op": "random_crop", "size": 10, "padding": 2}, (10, 10)),
    ({"op": "resize", "size": 40}, (40, 40)),
    ({"op": "resize", "size": [8, 6]}, (8, 6)),
    ({"op": "center_crop", "size": 10}, (10, 10)),
])
def test_each_op_shape_dtype_train_and_eval(s, op, expect):
    p = pipe([op], s)
    hw = expect or (s.height, s.width)
    assert p.output_shape == (s.channels, *hw)
    x = images(6, s)
    for train in (True, False):
        y = p(x, train=train, generator=gen())
        assert y.dtype == torch.float32 and tuple(y.shape) == (6, *p.output_shape)
        assert y.is_contiguous() and torch.isfinite(y).all()


@pytest.mark.parametrize("s", SPECS, ids=SPEC_IDS)
def test_all_ops_together_any_order(s):
    ops = [{"op": "random_crop", "padding": 3}, "hflip", "vflip", "color_jitter", "rotation",
           {"op": "resize", "size": 16}, {"op": "center_crop", "size": 12}, "normalize"]
    for order in (ops, ops[::-1][1:] + ["normalize"], [ops[5], ops[3], ops[0], ops[4], ops[7]]):
        p = pipe(order, s)
        x = images(5, s)
        a = p(x, train=True, generator=gen(1))
        e = p(x, train=False)
        assert a.shape == e.shape == (5, *p.output_shape)
        assert torch.isfinite(a).all()


def test_center_crop_28_gives_model_shape():
    p = pipe([{"op": "center_crop", "size": 24}, "normalize"], spec(1, 28))
    assert p.output_shape == (1, 24, 24)
    x = images(4, spec(1, 28))
    expected = (x[:, :, 2:26, 2:26].float() / 255 - 0.4) / 0.2
    torch.testing.assert_close(p(x, train=True), expected)
    torch.testing.assert_close(p(x, train=False), expected)


def test_no_ops_scales_to_unit_range():
    s = spec(3, 8)
    x = images(3, s)
    p = pipe([], s)
    assert p.output_shape == (3, 8, 8)
    torch.testing.assert_close(p(x, train=True), x.float() / 255)


# ------------------------------------------------------------------------------- exact semantics


@pytest.mark.parametrize("s", SPECS, ids=SPEC_IDS)
def test_random_crop_outputs_are_crops_of_padded_input(s):
    pad = 4
    p = pipe([{"op": "random_crop", "padding": pad}], s)
    x = images(24, s)
    y = p(x, train=True, generator=gen(5))
    padded = F.pad(x.float() / 255, (pad,) * 4)
    offsets = []
    for i in range(len(x)):
        match = [(t, l) for t, l in itertools.product(range(2 * pad + 1), repeat=2)
                 if torch.equal(padded[i, :, t : t + s.height, l : l + s.width], y[i])]
        assert len(match) == 1, f"sample {i} is not a crop of its padded input"
        offsets.append(match[0])
    assert len(set(offsets)) > 5  # per-sample offsets, not one for the batch
    assert any(o != (pad, pad) for o in offsets)  # content actually shifts


def test_random_crop_known_offset_by_reseeding():
    """The offsets are torch.randint draws from the generator: top first, then left."""
    s = spec(3, 16)
    pad, b = 2, 5
    x = images(b, s)
    y = pipe([{"op": "random_crop", "padding": pad}], s)(x, train=True, generator=gen(11))
    g = gen(11)
    top = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    padded = F.pad(x, (pad,) * 4)
    for i in range(b):
        t, l = int(top[i]), int(left[i])
        torch.testing.assert_close(y[i], padded[i, :, t : t + 16, l : l + 16].float() / 255)


def test_random_crop_smaller_size_is_center_crop_in_eval():
    s = spec(1, 28)
    p = pipe([{"op": "random_crop", "size": 24, "padding": 0}], s)
    x = images(4, s)
    torch.testing.assert_close(p(x, train=False), x[:, :, 2:26, 2:26].float() / 255)
    y = p(x, train=True, generator=gen())
    assert y.shape == (4, 1, 24, 24)


def test_hflip_vflip_p1_and_p0():
    s = spec(3, 10)
    x = images(4, s)
    xf = x.float() / 255
    torch.testing.assert_close(pipe([{"op": "hflip", "p": 1.0}], s)(x, True, gen()), xf.flip(-1))
    torch.testing.assert_close(pipe([{"op": "vflip", "p": 1}], s)(x, True, gen()), xf.flip(-2))
    torch.testing.assert_close(pipe([{"op": "hflip", "p": 0}], s)(x, True, gen()), xf)
    torch.testing.assert_close(pipe([{"op": "hflip", "p": 1.0}], s)(x, False), xf)  # eval: no flip


def test_hflip_half_flips_some_samples():
    s = spec(1, 8)
    x = images(64, s)
    y = pipe(["hflip"], s)(x, True, gen(2))
    xf = x.float() / 255
    flipped = [torch.equal(y[i], xf[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(y[i], xf[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_rotation_90_degrees_is_rot90():
    x = torch.rand(2, 3, 9, 9)
    y = rotate(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(y[0], x[0].rot90(1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], x[1].rot90(-1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, torch.zeros(2)), x, atol=1e-5, rtol=0)


def test_rotation_varies_per_sample():
    s = spec(1, 16)
    x = images(1, s).expand(8, -1, -1, -1).contiguous()
    y = pipe([{"op": "rotation", "degrees": 30}], s)(x, True, gen())
    assert len({tuple(v.flatten()[:40].tolist()) for v in y}) == 8
    torch.testing.assert_close(pipe(["rotation"], s)(x, False), x.float() / 255)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_range_and_identity(channels):
    s = spec(channels, 12)
    x = images(16, s)
    y = pipe(["color_jitter"], s)(x, True, gen())
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x.float() / 255)
    off = {"op": "color_jitter", "brightness": 0, "contrast": 0, "saturation": 0}
    torch.testing.assert_close(pipe([off], s)(x, True, gen()), x.float() / 255)
    sat_only = {"op": "color_jitter", "brightness": 0, "contrast": 0, "saturation": 0.9}
    changed = not torch.allclose(pipe([sat_only], s)(x, True, gen()), x.float() / 255)
    assert changed == (channels == 3)  # saturation needs colour


def test_resize_matches_interpolate():
    s = spec(3, 32)
    x = images(3, s)
    y = pipe([{"op": "resize", "size": 16}], s)(x, False)
    ref = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(y, ref)
    up = pipe([{"op": "resize", "size": [64, 48]}], s)
    assert up.output_shape == (3, 64, 48) and up(x, True, gen()).shape == (3, 3, 64, 48)


def test_normalize_dataset_stats_gives_zero_mean_unit_std():
    g = gen(3)
    base = torch.tensor([60.0, 120.0, 200.0])[None, :, None, None]
    x = (base + 25 * torch.randn(256, 3, 16, 16, generator=g)).round().clamp(0, 255).to(torch.uint8)
    xf = x.float() / 255
    mean, std = xf.mean((0, 2, 3)).tolist(), xf.std((0, 2, 3)).tolist()
    s = spec(3, 16, mean=mean, std=std)
    y = pipe(["normalize"], s)(x, train=False)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    half = pipe([{"op": "normalize", "stats": "half"}], s)(x, train=True)
    torch.testing.assert_close(half, (xf - 0.5) / 0.5)


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_output_eval_deterministic():
    s = spec(3, 32)
    p = pipe([{"op": "random_crop", "padding": 4}, "hflip", "color_jitter", "rotation", "normalize"], s)
    x = images(16, s)
    a, b = p(x, True, gen(42)), p(x, True, gen(42))
    assert torch.equal(a, b)
    assert not torch.equal(a, p(x, True, gen(43)))
    e1, e2 = p(x, False), p(x, False, gen(9))
    assert torch.equal(e1, e2) and e1.shape == a.shape
    expected = (x.float() / 255 - torch.tensor(s.mean)[:, None, None]) / torch.tensor(s.std)[:, None, None]
    torch.testing.assert_close(e1, expected)


def test_input_is_not_modified_and_float_input_accepted():
    s = spec(3, 16)
    x = images(4, s)
    x0 = x.clone()
    p = pipe(["random_crop", "hflip", "color_jitter", "normalize"], s)
    p(x, True, gen())
    assert torch.equal(x, x0)
    xf = x.float() / 255
    xf0 = xf.clone()
    torch.testing.assert_close(p(xf, True, gen(1)), p(x, True, gen(1)))
    assert torch.equal(xf, xf0)


def test_wrong_input_shape_or_generator_device():
    p = pipe(["normalize"], spec(3, 32))
    with pytest.raises(ValueError, match=r"built for images \[B, 3, 32, 32\]"):
        p(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), train=False)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            p(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device="cuda"), True, gen())


# ------------------------------------------------------------------------------- config


def test_default_config_and_omegaconf_schema():
    assert list(OPS) == ["random_crop", "hflip", "vflip", "color_jitter", "rotation", "resize",
                         "center_crop", "normalize"]
    assert AugmentationConfig().ops == ["normalize"]
    node = {"name": "cifar_basic",
            "ops": [{"op": "random_crop", "padding": 4}, "hflip", {"op": "normalize"}]}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AugmentationConfig), node))
    cfg.validate()
    assert build_pipeline(cfg, spec(3, 32)).output_shape == (3, 32, 32)
    # a DictConfig (not converted) validates and builds too
    dc = OmegaConf.merge(OmegaConf.structured(AugmentationConfig), node)
    assert build_pipeline(dc, spec(1, 28)).output_shape == (1, 28, 28)


@pytest.mark.parametrize("ops,match", [
    (["flip"], r"augmentation\.ops\[0\]='flip' is not valid; choose one of: random_crop, hflip, vflip"),
    (["hflip", {"op": "blur"}], r"augmentation\.ops\[1\]\.op='blur' is not valid; choose one of: random_crop"),
    ([{"size": 3}], r"augmentation\.ops\[0\] needs an 'op' key.*random_crop"),
    (["hflip", {"op": "random_crop", "pading": 4}],
     r"augmentation\.ops\[1\]\.pading is not a parameter of random_crop; valid parameters: size .*padding"),
    ([{"op": "random_crop", "padding": -1}], r"augmentation\.ops\[0\]\.padding=-1 is out of range"),
    ([{"op": "random_crop", "padding": 1.5}], r"augmentation\.ops\[0\]\.padding=1\.5 must be a whole number"),
    ([{"op": "hflip", "p": 1.5}], r"augmentation\.ops\[0\]\.p=1\.5 is out of range: it must be in \[0, 1\]"),
    ([{"op": "hflip", "p": "often"}], r"augmentation\.ops\[0\]\.p='often' must be a number"),
    ([{"op": "rotation", "degrees": 270}], r"augmentation\.ops\[0\]\.degrees=270 is out of range"),
    ([{"op": "color_jitter", "contrast": -0.1}], r"augmentation\.ops\[0\]\.contrast=-0\.1 is out of range"),
    (["resize"], r"augmentation\.ops\[0\]\.size must be set for resize"),
    ([{"op": "center_crop", "size": [1, 2, 3]}], r"augmentation\.ops\[0\]\.size=\[1, 2, 3\] must be one number or \[height, width\]"),
    ([{"op": "normalize", "stats": "imagenet"}], r"augmentation\.ops\[0\]\.stats='imagenet' is not valid; choose one of: dataset, half"),
    ([3], r"augmentation\.ops\[0\]=3 must be an op name"),
])
def test_config_errors_name_key_and_choices(ops, match):
    with pytest.raises(ConfigError, match=match):
        AugmentationConfig(ops=ops).validate()


def test_crop_larger_than_image_at_that_point():
    with pytest.raises(ConfigError, match=r"augmentation\.ops\[0\]\.size=32x32 \(center_crop\) is larger than the 28x28 image"):
        build_pipeline(AugmentationConfig(ops=[{"op": "center_crop", "size": 32}]), spec(1, 28))
    ops = [{"op": "resize", "size": 20}, "hflip", {"op": "random_crop", "size": 24}]
    with pytest.raises(ConfigError, match=r"ops\[2\]\.size=24x24 \(random_crop\) is larger than the 20x20 image .*after resize -> hflip"):
        build_pipeline(AugmentationConfig(ops=ops), spec(3, 32))
    # the same crop after upscaling is fine
    ok = [{"op": "resize", "size": 40}, {"op": "random_crop", "size": 36}]
    assert build_pipeline(AugmentationConfig(ops=ok), spec(3, 32)).output_shape == (3, 36, 36)


def test_color_jitter_after_normalize_rejected():
    with pytest.raises(ConfigError, match=r"ops\[1\]: color_jitter .* before normalize \(augmentation\.ops\[0\]\)"):
        build_pipeline(AugmentationConfig(ops=["normalize", "color_jitter"]), spec(3, 32))


# ------------------------------------------------------------------------------- the op registry

BUILTIN_OPS = ["random_crop", "hflip", "vflip", "color_jitter", "rotation", "resize", "center_crop", "normalize"]


@pytest.fixture
def registered():
    """Names a test registers: unregistered afterwards, whether the test passes or fails."""
    names: list[str] = []
    yield names
    for name in names:
        if name in OPS:
            unregister_op(name)


def test_custom_op_registers_builds_runs_and_is_validated(registered):
    @register_op("test_invert", p=0.5, trim=Param(0, whole(0)))  # p: the shared probability check
    class Invert(Op):
        """Inverts each image with probability p (training only); drops its last `trim` rows."""

        def __init__(self, ctx, p, trim):
            if trim >= ctx.shape[1]:
                raise ConfigError(f"{ctx.key}.trim={trim} leaves no rows of the {ctx.shape[1]}-row image")
            self.p, self.trim = p, trim

        def output_shape(self, shape):
            c, h, w = shape
            return (c, h - self.trim, w)

        def train(self, x, g):
            mask = torch.rand(x.shape[0], generator=g, device=x.device) < self.p
            return self.eval(torch.where(mask[:, None, None, None], 1 - x, x))

        def eval(self, x):
            return x[:, :, : x.shape[2] - self.trim]

    registered.append("test_invert")
    assert list(OPS) == [*BUILTIN_OPS, "test_invert"] and OPS["test_invert"] == {"p": 0.5, "trim": 0}

    s = spec(3, 16)
    x = images(6, s)
    xf = x.float() / 255
    p = pipe(["hflip", {"op": "test_invert", "p": 1, "trim": 3}, {"op": "normalize", "stats": "half"}], s)
    assert p.output_shape == (3, 13, 16)
    flips = torch.rand(6, generator=gen(7)) < 0.5  # hflip's draw comes first
    flipped = torch.where(flips[:, None, None, None], xf.flip(-1), xf)
    torch.testing.assert_close(p(x, True, gen(7)), ((1 - flipped[:, :, :13]) - 0.5) / 0.5)
    torch.testing.assert_close(p(x, False), (xf[:, :, :13] - 0.5) / 0.5)
    half = pipe(["test_invert"], s)  # p=0.5: one draw per sample, from the pipeline's generator
    inverted = torch.rand(6, generator=gen(3)) < 0.5
    torch.testing.assert_close(half(x, True, gen(3)), torch.where(inverted[:, None, None, None], 1 - xf, xf))

    for ops, match in [
        ([{"op": "test_invert", "p": 2}], r"ops\[0\]\.p=2 is out of range: it must be in \[0, 1\]"),
        ([{"op": "test_invert", "trim": 1.5}], r"ops\[0\]\.trim=1\.5 must be a whole number >= 0"),
        ([{"op": "test_invert", "trimm": 1}],
         r"trimm is not a parameter of test_invert; valid parameters: p \(default 0\.5\), trim \(default 0\)"),
        (["blur"], r"'blur' is not valid; choose one of: random_crop, .*, normalize, test_invert"),
    ]:
        with pytest.raises(ConfigError, match=match):
            AugmentationConfig(ops=ops).validate()
    with pytest.raises(ConfigError, match=r"ops\[1\]\.trim=16 leaves no rows"):  # the op's own build-time check
        build_pipeline(AugmentationConfig(ops=["hflip", {"op": "test_invert", "trim": 16}]), s)
    after_trim = [{"op": "test_invert", "trim": 6}, {"op": "center_crop", "size": 12}]  # its output_shape counts
    with pytest.raises(ConfigError, match=r"ops\[1\]\.size=12x12 \(center_crop\) is larger than the 10x16 image "
                                          r".*after test_invert"):
        build_pipeline(AugmentationConfig(ops=after_trim), s)

    unregister_op("test_invert")
    assert list(OPS) == BUILTIN_OPS
    with pytest.raises(ConfigError, match="'test_invert' is not valid"):
        AugmentationConfig(ops=["test_invert"]).validate()


def test_duplicate_names_and_malformed_declarations_are_refused(registered):
    class Keep(Op):
        def eval(self, x):
            return x

    with pytest.raises(ValueError, match="augmentation op 'hflip' is already registered"):
        register_op("hflip", p=0.5)(Keep)
    s = spec(3, 8)
    x = images(2, s)
    torch.testing.assert_close(pipe([{"op": "hflip", "p": 1}], s)(x, True, gen()), x.flip(-1).float() / 255)
    register_op("test_keep")(Keep)
    registered.append("test_keep")
    with pytest.raises(ValueError, match="'test_keep' is already registered"):
        register_op("test_keep")(Keep)

    class TakesQ(Op):
        def __init__(self, ctx, q):
            self.q = q

        def eval(self, x):
            return x

    class Nothing(Op):
        pass

    with pytest.raises(TypeError, match="parameter 'holes' needs a check"):  # bare default, not a shared name
        register_op("test_bad", holes=1)
    with pytest.raises(TypeError, match="'op' cannot be a parameter name"):
        register_op("test_bad", op=Param(1, whole(0)))
    with pytest.raises(ValueError, match=r"default fails its own check: test_bad\.p=1\.5 is out of range"):
        register_op("test_bad", p=1.5)
    with pytest.raises(TypeError, match="a subclass of cnnlab.data.augment.Op"):
        register_op("test_bad")(object)
    with pytest.raises(TypeError, match=r"TakesQ\(ctx, p\)"):
        register_op("test_bad", p=0.5)(TakesQ)
    with pytest.raises(TypeError, match="defines neither train nor eval"):
        register_op("test_bad")(Nothing)
    assert list(OPS) == [*BUILTIN_OPS, "test_keep"]
