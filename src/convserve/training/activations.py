"""Activation registry: a lower-case name -> a module factory (timm ``layers/create_act.py``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

ActFactory = Callable[[], nn.Module]

_ACTIVATIONS: dict[str, Callable[..., nn.Module]] = dict(
    sigmoid=nn.Sigmoid,
    tanh=nn.Tanh,
    relu=nn.ReLU,
    leaky_relu=nn.LeakyReLU,
    elu=nn.ELU,
    gelu=nn.GELU,
    selu=nn.SELU,
    identity=nn.Identity,
)

# Activations that flatten out at both ends: their derivative is below 0.02 once |output| is
# within 1% of the asymptote, which is what "saturated" means in the diagnostics.
SATURATING = {"sigmoid": (0.01, 0.99), "tanh": (-0.99, 0.99)}


def activation_names() -> list[str]:
    return sorted(_ACTIVATIONS)


def get_act_layer(name: str, negative_slope: float = 0.01) -> ActFactory:
    """Resolve a name to a factory once, in the builder; blocks call the factory."""
    try:
        factory = _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of: {', '.join(activation_names())}"
        ) from None
    if name == "leaky_relu":
        return partial(nn.LeakyReLU, negative_slope=negative_slope)
    return factory


def gain_for(name: str, negative_slope: float = 0.01) -> float:
    """The recommended weight gain for an activation, as ``torch.nn.init.calculate_gain``.

    GELU and ELU have no closed form there; they behave like ReLU for positive inputs, so the
    ReLU gain sqrt(2) is used (He et al. 2015 derive it from the half-rectified variance).
    """
    if name == "leaky_relu":
        return float(nn.init.calculate_gain("leaky_relu", negative_slope))
    if name in ("gelu", "elu"):
        return float(nn.init.calculate_gain("relu"))
    if name == "identity":
        return 1.0
    return float(nn.init.calculate_gain(name))  # type: ignore[arg-type]
