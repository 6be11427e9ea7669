"""Building blocks shared by every model family: activations, norms, weight init, shape maths."""
from __future__ import annotations

from torch import nn

from cnnlab.checks import ConfigError, check_choice

# Accepted values of model.activation; "swish" is an alias of "silu" (same function, two names in the literature).
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "sigmoid", "tanh", "silu", "swish", "gelu")
# Accepted values of model.init.
INIT_SCHEMES: tuple[str, ...] = ("kaiming", "pytorch_default")

LEAKY_RELU_SLOPE = 0.01  # torch's default negative slope; init uses the same value for its gain


def make_activation(name: str, key: str = "model.activation") -> nn.Module:
    """A fresh activation module (one per use, so forward hooks see each call site separately)."""
    check_choice(key, name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_RELU_SLOPE)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name in ("silu", "swish"):
        return nn.SiLU()
    return nn.GELU()


def make_norm2d(channels: int, enabled: bool) -> nn.Module:
    """BatchNorm2d, or Identity when batch_norm is off (keeps module indices the same either way)."""
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


def make_norm1d(features: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm1d(features) if enabled else nn.Identity()


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a conv or pool along one axis (floor mode, dilation 1), as torch computes it."""
    return (size + 2 * padding - kernel) // stride + 1


def check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """Two positive ints (height, width), else ConfigError."""
    try:
        h, w = input_size
    except (TypeError, ValueError):
        raise ConfigError(f"input_size={input_size!r} is not valid; expected (height, width)") from None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in (h, w)):
        raise ConfigError(f"input_size={input_size!r} is not valid; expected two positive ints (height, width)")
    return h, w


def _init_weight(weight, activation: str, mode: str) -> None:
    if activation in ("sigmoid", "tanh"):
        # Saturating activations: He init assumes half the units are zeroed (ReLU), which is wrong here;
        # Glorot keeps the pre-activations in the near-linear range, scaled by the activation's gain.
        nn.init.xavier_normal_(weight, gain=nn.init.calculate_gain(activation))
    elif activation == "leaky_relu":
        nn.init.kaiming_normal_(weight, a=LEAKY_RELU_SLOPE, mode=mode, nonlinearity="leaky_relu")
    else:
        # relu, and silu/swish/gelu, which act like ReLU away from zero; torch has no gain for them.
        nn.init.kaiming_normal_(weight, mode=mode, nonlinearity="relu")


def init_weights(model: nn.Module, scheme: str, activation: str) -> None:
    """Initialise model in place.

    "kaiming": convs get He-normal (fan_out, as torchvision's ResNet/VGG) or Glorot for sigmoid/tanh;
    hidden Linear layers the same with fan_in, so the un-normalised classifier MLP keeps its signal
    scale in the forward pass (torchvision's VGG uses N(0, 0.01) for all of them, which shrinks the
    signal ~4x per 512-wide layer and is one reason a from-scratch VGG sits at loss ln(classes));
    the last Linear (the head) gets N(0, 0.01) so the first logits are near zero and the first loss is
    ~ln(classes) instead of a confident wrong guess. Biases 0, norm weight 1 / bias 0. Finally every
    module that defines `zero_init_last()` is asked to shrink its last layer: residual blocks zero
    their branch (they start as the identity), AlexNet/ConvNet5/CifarNet start their last BN gamma
    small and NiN its logits conv near 0, so the first steps do not blow up.
    "pytorch_default": touch nothing, so runs compare against torch's own per-layer defaults.
    """
    check_choice("model.init", scheme, INIT_SCHEMES)
    check_choice("model.activation", activation, ACTIVATIONS)
    if scheme == "pytorch_default":
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None  # every family defines its classifier head last
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _init_weight(m.weight, activation, mode="fan_out")
        elif isinstance(m, nn.Linear):
            if m is head:
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                _init_weight(m.weight, activation, mode="fan_in")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    for m in model.modules():
        zero_init_last = getattr(m, "zero_init_last", None)
        if callable(zero_init_last):
            zero_init_last()
