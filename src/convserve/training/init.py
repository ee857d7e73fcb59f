"""Initialiser registry: pure functions applied to each conv and linear layer by module name.

Every initialiser has one signature, ``fn(layer, cfg)``: ``layer`` tells which module it
initialises, the activation that follows it (``head.out`` is followed by softmax and counts as
``identity``, so a rule can treat the head differently), the Leaky ReLU slope and, for
data-dependent initialisers (LSUV), the model and a batch of training inputs. Biases start at
``cfg.bias`` (zero by default) before the initialiser runs; ``default`` resets both weight and
bias to PyTorch's own. ``cfg.scale`` multiplies every weight afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from convserve.training.activations import gain_for
from convserve.training.config import InitConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """What an initialiser knows of the layer it initialises."""

    name: str  # qualified module name, e.g. "features.block1.conv" or "head.out"
    module: nn.Conv2d | nn.Linear
    activation: str = "identity"  # the activation that follows the layer
    negative_slope: float = 0.01  # of leaky_relu
    model: nn.Module | None = None  # the whole model, for data-dependent initialisers
    batch: Tensor | None = None  # training inputs, for data-dependent initialisers

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def gain(self, cfg: InitConfig) -> float:
        """The configured gain, else the recommended one for the following activation."""
        return cfg.gain if cfg.gain is not None else gain_for(self.activation, self.negative_slope)


InitFn = Callable[[Layer, InitConfig], None]


def fans(weight: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out): in_channels * k * k and out_channels * k * k for a convolution."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return weight.size(1) * receptive, weight.size(0) * receptive


def init_default(layer: Layer, cfg: InitConfig) -> None:
    """PyTorch's own, weight and bias (Kaiming uniform with a = sqrt(5), i.e.
    U(+-1/sqrt(fan_in)), and U(+-1/sqrt(fan_in)) for the bias)."""
    layer.module.reset_parameters()


def init_constant(layer: Layer, cfg: InitConfig) -> None:
    """Every weight the same value: the symmetry problem in its purest form.

    All units of a layer then compute the same output and receive the same gradient, so they
    stay identical for ever (any activation).
    """
    nn.init.constant_(layer.weight, cfg.value)


def init_zeros(layer: Layer, cfg: InitConfig) -> None:
    """All zeros: symmetric, and with ReLU/tanh no signal passes at all."""
    nn.init.zeros_(layer.weight)


def init_normal(layer: Layer, cfg: InitConfig) -> None:
    """N(mean, std^2) with a fixed std, ignoring the fan: too small a std makes deep networks'
    signals and gradients vanish, too large a std makes them explode (any activation)."""
    nn.init.normal_(layer.weight, cfg.mean, cfg.std)


def init_uniform(layer: Layer, cfg: InitConfig) -> None:
    """U(a, b) with fixed bounds; the "standard" heuristic criticised by Glorot & Bengio 2010."""
    nn.init.uniform_(layer.weight, cfg.a, cfg.b)


def init_xavier_uniform(layer: Layer, cfg: InitConfig) -> None:
    """U(-r, r), r = gain * sqrt(6 / (fan_in + fan_out)): Glorot & Bengio 2010, eq. 16.

    Derived for symmetric activations that are linear around zero (tanh, softsign), where it
    keeps the variance of activations and of back-propagated gradients equal across layers.
    Gain 1 unless given, as in the paper.
    """
    fan_in, fan_out = fans(layer.weight)
    gain = cfg.gain if cfg.gain is not None else 1.0
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(layer.weight, -bound, bound)


def init_xavier_normal(layer: Layer, cfg: InitConfig) -> None:
    """N(0, gain^2 * 2 / (fan_in + fan_out)): the normal form of Glorot & Bengio 2010, eq. 12,
    derived for tanh-like activations. Gain 1 unless given."""
    fan_in, fan_out = fans(layer.weight)
    gain = cfg.gain if cfg.gain is not None else 1.0
    nn.init.normal_(layer.weight, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _he_std(layer: Layer, cfg: InitConfig) -> float:
    fan_in, fan_out = fans(layer.weight)
    return layer.gain(cfg) / math.sqrt(fan_in if cfg.mode == "fan_in" else fan_out)


def init_he_normal(layer: Layer, cfg: InitConfig) -> None:
    """N(0, gain^2 / fan): He et al. 2015, eq. 10, where gain^2 = 2 for ReLU and
    2 / (1 + slope^2) for Leaky ReLU. Derived for rectifiers; the gain follows the layer's
    activation unless given. ``mode=fan_out`` keeps the backward variance instead (eq. 14)."""
    nn.init.normal_(layer.weight, 0.0, _he_std(layer, cfg))


def init_he_uniform(layer: Layer, cfg: InitConfig) -> None:
    """U(-r, r) with r = sqrt(3) * gain / sqrt(fan): the uniform law of He et al. 2015's
    variance, for rectifiers."""
    bound = math.sqrt(3.0) * _he_std(layer, cfg)
    nn.init.uniform_(layer.weight, -bound, bound)


def init_orthogonal(layer: Layer, cfg: InitConfig) -> None:
    """A (semi-)orthogonal matrix times the activation's gain: Saxe et al. 2014. It keeps the
    norm of signals exactly for linear networks, and with the gain approximately for others."""
    nn.init.orthogonal_(layer.weight, gain=layer.gain(cfg))


def init_lsuv(layer: Layer, cfg: InitConfig) -> None:
    """Layer-sequential unit variance (Mishkin & Matas 2015, Algorithm 1): an orthonormal
    start, then the weight is divided by the standard deviation of the layer's output on a
    batch of training data until the variance is within ``lsuv_tolerance`` of 1.

    Layers are visited in forward order, so each one sees inputs from layers already scaled.
    Derived for any activation; the paper shows it for ReLU, maxout and tanh.
    """
    if layer.model is None or layer.batch is None:
        raise ValueError("lsuv needs a batch of training data to scale each layer")
    init_orthogonal(layer, cfg)
    unit_variance_(layer, cfg.lsuv_tolerance, cfg.lsuv_max_iter)


_INITIALIZERS: dict[str, InitFn] = dict(
    default=init_default,
    constant=init_constant,
    zeros=init_zeros,
    normal=init_normal,
    uniform=init_uniform,
    xavier_uniform=init_xavier_uniform,
    xavier_normal=init_xavier_normal,
    he_uniform=init_he_uniform,
    he_normal=init_he_normal,
    orthogonal=init_orthogonal,
    lsuv=init_lsuv,
)


def initializer_names() -> list[str]:
    return sorted(_INITIALIZERS)


def get_initializer(name: str | InitFn) -> InitFn:
    """A registered initialiser by name; a function passes through."""
    if callable(name):
        return name
    try:
        return _INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initialiser {name!r}; choose one of: {', '.join(initializer_names())}"
        ) from None


def initialize(
    model: nn.Module,
    cfg: InitConfig,
    layer_activation: dict[str, str],
    negative_slope: float = 0.01,
    batch: Tensor | None = None,
) -> None:
    """Initialise every conv and linear layer of ``model`` by name (timm ``named_apply``).

    ``layer_activation`` maps qualified layer names to the activation that follows them;
    ``batch`` (training inputs) is what data-dependent initialisers such as ``lsuv`` use.
    """
    init_fn = get_initializer(cfg.name)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Conv2d | nn.Linear):
                continue
            if module.bias is not None:
                nn.init.constant_(module.bias, cfg.bias)
            layer = Layer(
                name,
                module,
                layer_activation.get(name, "identity"),
                negative_slope,
                model,
                batch,
            )
            init_fn(layer, cfg)
            if cfg.scale != 1.0:
                module.weight.mul_(cfg.scale)


@torch.no_grad()
def unit_variance_(layer: Layer, tolerance: float = 0.05, max_iter: int = 10) -> None:
    """Divide ``layer``'s weight by the std of its output on ``layer.batch`` until the output
    variance is within ``tolerance`` of 1 (LSUV's inner loop)."""
    assert layer.model is not None and layer.batch is not None
    model = layer.model
    was_training = model.training
    model.eval()
    captured: dict[str, Tensor] = {}

    def keep(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
        captured["out"] = out

    handle = layer.module.register_forward_hook(keep)
    try:
        for _ in range(max_iter):
            model(layer.batch)
            var = float(captured["out"].var())
            if not math.isfinite(var) or var < 1e-12:
                log.warning("lsuv: %s has output variance %.3g; left as is", layer.name, var)
                break
            if abs(var - 1.0) < tolerance:
                break
            layer.weight.div_(math.sqrt(var))
    finally:
        handle.remove()
        model.train(was_training)
