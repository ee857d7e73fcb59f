"""Which configuration knob a diagnosis points to, with the evidence that separates the
candidates (the init's name or scale, the bias, the learning rate, the activation, the depth).

Two signatures tell them apart:

- **At initialisation**, before any update, the signal's scale from one hidden layer to the
  next depends only on the init and the activation. Init theory predicts that gain: a
  variance-preserving init (He for the ReLU family, Xavier for tanh, orthogonal and LSUV with
  the activation's gain) keeps it near 1; Xavier's unit gain under ReLU halves the variance
  per layer (0.71); sigmoid's slope of at most 1/4 gives 0.25 whatever the init; a fixed
  standard deviation ignores the fan-in. ``init.scale`` multiplies the prediction. A run whose
  measured change across its hidden layers drifts beyond ``DRIFT`` at step 1 in the direction
  its init predicts is the init's doing.
- **After a healthy start**, the step where the run turned and the update-to-weight ratio
  before it: steps that change the weights by several percent at once (about 1e-3 is the
  usual rule) are the learning rate's signature; a loss that became non-finite after a
  healthy start is too.

What is left: a bias below zero that starts units dead, an activation that cannot carry the
gradient (sigmoid) or that loses units for good (ReLU), and depth that a variance-preserving
init does not tame (a block's ``batch_norm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convserve.training.diagnostics import Snapshot, hidden_layers, ratios

if TYPE_CHECKING:
    from convserve.training.config import TrainConfig

KNOBS = ("init.name", "init.scale", "init.bias", "optim.lr", "model.activation", "depth")
DRIFT = 4.0  # a change across the hidden layers beyond 4x either way at step 1
UPDATE_RATIO = 0.03  # an update-to-weight ratio per step above this: the lr's signature
# the variance an activation keeps of a zero-mean input, near zero (its slope squared there)
_KEPT = {"relu": 0.5, "gelu": 0.5, "elu": 0.5, "tanh": 1.0, "sigmoid": 1 / 16}
_RECTIFIERS = {"relu", "leaky_relu", "elu", "gelu"}


@dataclass(frozen=True)
class Setup:
    """What the run was configured with, as far as the attribution reads it."""

    activation: str = "relu"
    init: str = "he_normal"
    scale: float = 1.0
    bias: float = 0.0
    lr: float | None = None
    negative_slope: float = 0.01
    batch_norm: bool = False  # in some conv block

    @classmethod
    def of(cls, cfg: TrainConfig) -> Setup:
        return cls(
            cfg.model.activation,
            cfg.init.name,
            cfg.init.scale,
            cfg.init.bias,
            cfg.optim.lr,
            cfg.model.negative_slope,
            any(block.batch_norm for block in cfg.model.blocks),
        )

    @property
    def family(self) -> str:
        """The variance-preserving init for the activation."""
        return "he_normal" if self.activation in _RECTIFIERS else "xavier_normal"


@dataclass(frozen=True)
class Attribution:
    knob: str  # one of KNOBS
    evidence: str  # what separates it from the other candidates
    advice: str  # the change to that knob


def predicted_gain(setup: Setup) -> float | None:
    """The per-layer change of the activations' std that init theory predicts at
    ``init.scale=1``; None where the init has no such prediction (a fixed std or bound, a
    constant)."""
    kept = _KEPT.get(setup.activation, (1 + setup.negative_slope**2) / 2)
    if setup.init in ("he_normal", "he_uniform", "orthogonal"):
        gain_sq = (
            2 / (1 + setup.negative_slope**2)
            if setup.activation == "leaky_relu"
            else {"sigmoid": 1.0, "tanh": 25 / 9}.get(setup.activation, 2.0)
        )
        return math.sqrt(gain_sq * kept)
    if setup.init in ("xavier_normal", "xavier_uniform"):
        return math.sqrt(kept)  # unit gain: fan_in Var(w) = 1 for equal fans
    if setup.init == "default":  # U(+-1/sqrt(fan_in)): fan_in Var(w) = 1/3
        return math.sqrt(kept / 3)
    if setup.init == "lsuv":  # each layer scaled to unit output variance on data
        return 1.0
    return None


def measured_gain(snap: Snapshot) -> tuple[float, int] | None:
    """(the mean per-layer change of the activations' std across the hidden layers, their
    number); None with a single hidden layer."""
    layers = len(hidden_layers(snap))
    if layers < 2:
        return None
    growth = ratios(snap)["act_growth"]
    if not (math.isfinite(growth) and growth > 0):
        return None
    return growth ** (1 / (layers - 1)), layers


def _drift(first: Snapshot) -> float:
    """How far step 1 is from keeping the scale across the hidden layers: the larger of the
    activation growth and the gradient ratio, or their inverses."""
    r = ratios(first)
    values = [v for v in (r["act_growth"], r["grad_ratio"]) if math.isfinite(v) and v > 0]
    return max((max(v, 1 / v) for v in values), default=math.inf)


def _update_peak(snapshots: list[Snapshot]) -> float:
    """The largest update-to-weight ratio of a hidden layer in ``snapshots``."""
    return max(
        (
            s.layers[k].get("update_ratio", 0.0)
            for s in snapshots
            for k in hidden_layers(s)
            if math.isfinite(s.layers[k].get("update_ratio", 0.0))
        ),
        default=0.0,
    )


def _gain_words(first: Snapshot, setup: Setup) -> str:
    measured, predicted = measured_gain(first), predicted_gain(setup)
    said = (
        f"{measured[0]:.2f}x per hidden layer at step {first.step} ({measured[1]} layers)"
        if measured
        else f"{_drift(first):.3g}x across the hidden layers at step {first.step}"
    )
    if predicted is None:
        theory = f"init.name={setup.init} has no fan-in-aware scale to predict it from"
    else:
        theory = f"{setup.init} with {setup.activation} predicts {predicted:.2f}"
        if setup.scale != 1:
            theory += f" at init.scale=1, {predicted * setup.scale:.2f} at {setup.scale:g}"
    return f"the activations' std changes {said}; {theory}"


def attribute(
    cause: str,
    snapshots: list[Snapshot],
    turn: int,
    setup: Setup,
    diverged: bool = False,
) -> Attribution | None:
    """The knob behind ``cause`` (an unhealthy verdict); ``turn``: the index of the first
    unhealthy snapshot (``len(snapshots)`` when only the divergence was); None without
    snapshots."""
    if not snapshots:
        return None
    first = snapshots[0]
    late = turn > 0
    gain = _gain_words(first, setup)
    if cause == "symmetric":
        return Attribution(
            "init.name",
            f"init.name={setup.init} starts every unit of a layer alike",
            f"init.name={setup.family}",
        )
    if setup.bias < 0 and cause in ("dying", "vanishing"):
        return Attribution(
            "init.bias",
            f"init.bias={setup.bias:g} starts units below zero, where "
            f"{setup.activation} passes {'little' if setup.activation != 'relu' else 'no'} "
            f"gradient; {gain}",
            "init.bias=0",
        )
    from_init = _from_init(cause, first, setup, gain, late)
    if from_init is not None:
        return from_init
    if late:
        peak = _update_peak(snapshots[:turn])
        step = snapshots[turn].step if turn < len(snapshots) else None
        turned = f"it turned at step {step}" if step is not None else "the loss became non-finite"
        start = f"healthy at initialisation ({gain}); {turned}"
        if diverged or peak > UPDATE_RATIO or cause == "exploding":
            lr = f" (now {setup.lr:g}; try {setup.lr / 10:g})" if setup.lr else ""
            why = (
                "the learning rate's signature"
                if diverged or peak > UPDATE_RATIO
                else "a scale that grows after a healthy start comes from the updates"
            )
            return Attribution(
                "optim.lr",
                f"{start}, after steps that changed a layer's weights by up to {peak:.3g} of "
                f"their norm (about 1e-3 is usual): {why}",
                f"a lower optim.lr{lr}, or optim.grad_clip",
            )
        return _after_start(cause, setup, f"{start}, with updates of at most {peak:.3g}")
    return _after_start(cause, setup, gain)


def _from_init(
    cause: str, first: Snapshot, setup: Setup, gain: str, late: bool
) -> Attribution | None:
    """The init's scale or name, when step 1 drifted the way the init predicts, or saturated
    (a bounded activation's std cannot drift far: its pre-activations were too large)."""
    drift, predicted = _drift(first), predicted_gain(setup)
    if cause == "vanishing" and setup.activation == "sigmoid":
        return Attribution(
            "model.activation",
            f"sigmoid's slope is at most 0.25, so every layer shrinks the gradient whatever "
            f"the init; {gain}",
            "model.activation=tanh with init.name=xavier_normal, or relu with he_normal",
        )
    if drift <= DRIFT and not (cause == "saturated" and not late):
        return None
    growth = ratios(first)["act_growth"]
    grows = growth > 1 or cause in ("exploding", "saturated")
    if setup.scale != 1 and (setup.scale > 1) == grows:
        return Attribution(
            "init.scale",
            f"{gain}: the scale of {setup.scale:g} accounts for the drift",
            f"init.scale=1 (now {setup.scale:g})",
        )
    matched = predicted is not None and 0.8 <= predicted <= 1.25
    if not matched:
        return Attribution(
            "init.name",
            f"{gain}: {setup.family} keeps 1.00 for {setup.activation}",
            f"init.name={setup.family} (variance-preserving for {setup.activation})",
        )
    return None


def _after_start(cause: str, setup: Setup, evidence: str) -> Attribution:
    """With an init that keeps the scale and no learning-rate signature: the activation or
    the depth."""
    if cause == "dying":
        return Attribution(
            "model.activation",
            f"{evidence}: ReLU units that stop firing get no gradient to come back",
            "model.activation=leaky_relu",
        )
    if cause == "saturated":
        return Attribution(
            "model.activation",
            f"{evidence}: {setup.activation} units pinned to an asymptote pass almost no gradient",
            "model.activation=relu with init.name=he_normal",
        )
    remedy = (
        "fewer layers" if setup.batch_norm else "batch_norm: true in model.blocks, or fewer layers"
    )
    return Attribution(
        "depth",
        f"{evidence}: with an init that keeps the scale per layer, depth compounds what is left",
        remedy,
    )
