"""Initialiser registry: pure functions applied to each conv and linear weight by module name.

Each initialiser takes ``(weight, activation, cfg)`` where ``activation`` is the name of the
activation that follows the layer (``head.out`` is followed by softmax and counts as
``identity``), so a rule can treat the head differently. Biases are set separately to
``cfg.bias`` (zero by default), except for ``default``, which keeps PyTorch's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from convserve.training.activations import gain_for
from convserve.training.config import InitConfig

log = logging.getLogger(__name__)

InitFn = Callable[[Tensor, str, InitConfig], None]


def fans(weight: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out): in_channels * k * k and out_channels * k * k for a convolution."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return weight.size(1) * receptive, weight.size(0) * receptive


def _gain(activation: str, cfg: InitConfig, negative_slope: float) -> float:
    return cfg.gain if cfg.gain is not None else gain_for(activation, negative_slope)


def init_constant(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """Every weight the same value: the symmetry problem in its purest form.

    All units of a layer then compute the same output and receive the same gradient, so they
    stay identical for ever (any activation).
    """
    nn.init.constant_(weight, cfg.value)


def init_zeros(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """All zeros: symmetric, and with ReLU/tanh no signal passes at all."""
    nn.init.zeros_(weight)


def init_normal(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """N(mean, std^2) with a fixed std, ignoring the fan: too small a std makes deep networks'
    signals and gradients vanish, too large a std makes them explode (any activation)."""
    nn.init.normal_(weight, cfg.mean, cfg.std)


def init_uniform(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """U(a, b) with fixed bounds; the "standard" heuristic criticised by Glorot & Bengio 2010."""
    nn.init.uniform_(weight, cfg.a, cfg.b)


def init_xavier_uniform(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """U(-r, r), r = gain * sqrt(6 / (fan_in + fan_out)): Glorot & Bengio 2010, eq. 16.

    Derived for symmetric activations that are linear around zero (tanh, softsign), where it
    keeps the variance of activations and of back-propagated gradients equal across layers.
    Gain 1 unless given, as in the paper.
    """
    fan_in, fan_out = fans(weight)
    gain = cfg.gain if cfg.gain is not None else 1.0
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


def init_xavier_normal(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """N(0, gain^2 * 2 / (fan_in + fan_out)): the normal form of Glorot & Bengio 2010, eq. 12,
    derived for tanh-like activations. Gain 1 unless given."""
    fan_in, fan_out = fans(weight)
    gain = cfg.gain if cfg.gain is not None else 1.0
    nn.init.normal_(weight, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _he_std(weight: Tensor, activation: str, cfg: InitConfig, negative_slope: float) -> float:
    fan_in, fan_out = fans(weight)
    fan = fan_in if cfg.mode == "fan_in" else fan_out
    return _gain(activation, cfg, negative_slope) / math.sqrt(fan)


def init_he_normal(
    weight: Tensor, activation: str, cfg: InitConfig, negative_slope: float = 0.01
) -> None:
    """N(0, gain^2 / fan): He et al. 2015, eq. 10, where gain^2 = 2 for ReLU and
    2 / (1 + slope^2) for Leaky ReLU. Derived for rectifiers; the gain follows the layer's
    activation unless given. ``mode=fan_out`` keeps the backward variance instead (eq. 14)."""
    nn.init.normal_(weight, 0.0, _he_std(weight, activation, cfg, negative_slope))


def init_he_uniform(
    weight: Tensor, activation: str, cfg: InitConfig, negative_slope: float = 0.01
) -> None:
    """U(-r, r) with r = sqrt(3) * gain / sqrt(fan): the uniform law of He et al. 2015's
    variance, for rectifiers."""
    bound = math.sqrt(3.0) * _he_std(weight, activation, cfg, negative_slope)
    nn.init.uniform_(weight, -bound, bound)


def init_orthogonal(
    weight: Tensor, activation: str, cfg: InitConfig, negative_slope: float = 0.01
) -> None:
    """A (semi-)orthogonal matrix times the activation's gain: Saxe et al. 2014. It keeps the
    norm of signals exactly for linear networks, and with the gain approximately for others."""
    nn.init.orthogonal_(weight, gain=_gain(activation, cfg, negative_slope))


def init_default(weight: Tensor, activation: str, cfg: InitConfig) -> None:
    """PyTorch's own (Kaiming uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))); applied by
    calling the module's ``reset_parameters``, so this function is never called directly."""
    raise RuntimeError("'default' is applied through reset_parameters")


_INITIALIZERS: dict[str, Callable[..., None]] = dict(
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
    lsuv=init_orthogonal,  # LSUV starts orthonormal, then rescales with data (see lsuv_)
)
_TAKES_SLOPE = {"he_uniform", "he_normal", "orthogonal", "lsuv"}


def initializer_names() -> list[str]:
    return sorted(_INITIALIZERS)


def get_initializer(name: str) -> Callable[..., None]:
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

    ``layer_activation`` maps qualified layer names to the activation that follows them.
    ``lsuv`` needs ``batch``, a batch of training inputs.
    """
    init_fn = get_initializer(cfg.name)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Conv2d | nn.Linear):
                continue
            if cfg.name == "default":
                module.reset_parameters()
            else:
                activation = layer_activation.get(name, "identity")
                if cfg.name in _TAKES_SLOPE:
                    init_fn(module.weight, activation, cfg, negative_slope)
                else:
                    init_fn(module.weight, activation, cfg)
                if module.bias is not None:
                    nn.init.constant_(module.bias, cfg.bias)
            if cfg.scale != 1.0:
                module.weight.mul_(cfg.scale)
    if cfg.name == "lsuv":
        if batch is None:
            raise ValueError("lsuv needs a batch of training data to scale each layer")
        lsuv_(model, batch, cfg.lsuv_tolerance, cfg.lsuv_max_iter)


@torch.no_grad()
def lsuv_(model: nn.Module, batch: Tensor, tolerance: float = 0.05, max_iter: int = 10) -> None:
    """Layer-sequential unit variance (Mishkin & Matas 2015, Algorithm 1).

    After an orthonormal start, walk the layers in forward order and divide each weight by the
    standard deviation of that layer's output on ``batch`` until the variance is within
    ``tolerance`` of 1. Derived for any activation; the paper shows it for ReLU, maxout, tanh.
    """
    was_training = model.training
    model.eval()
    captured: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue

        def keep(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
            captured["out"] = out

        handle = module.register_forward_hook(keep)
        try:
            for _ in range(max_iter):
                model(batch)
                var = float(captured["out"].var())
                if not math.isfinite(var) or var < 1e-12:
                    log.warning("lsuv: %s has output variance %.3g; left as is", name, var)
                    break
                if abs(var - 1.0) < tolerance:
                    break
                module.weight.div_(math.sqrt(var))
        finally:
            handle.remove()
    model.train(was_training)
