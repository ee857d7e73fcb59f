"""The diagnosis names the knob: on real runs whose fault is known (a few of
``benchmarks/bench_attribution.py``'s cases), and on snapshots built by hand where each
signature is set apart."""

from __future__ import annotations

import math
from typing import Any

import pytest

from convserve.training.attribution import (
    DRIFT,
    UPDATE_RATIO,
    Setup,
    attribute,
    measured_gain,
    predicted_gain,
)
from convserve.training.config import DiagnosticsConfig
from convserve.training.diagnosis import diagnose
from convserve.training.diagnostics import Snapshot
from convserve.training.run import train

PLAIN = {"out_channels": 8, "pool": "none"}


def _mlp(layers: int) -> dict[str, Any]:
    return {"blocks": [], "hidden": [64] * layers}


@pytest.mark.parametrize(
    ("model", "init", "activation", "optim", "knob"),
    [
        ({"blocks": [PLAIN] * 6, "hidden": [32]}, {"scale": 2.0}, "relu", "sgd", "init.scale"),
        (_mlp(20), {"name": "xavier_uniform"}, "relu", "adam", "init.name"),
        (_mlp(3), {"bias": -1.0}, "relu", "sgd", "init.bias"),
        (_mlp(3), {}, "relu", "adam lr 0.5", "optim.lr"),
        (_mlp(10), {"name": "orthogonal"}, "sigmoid", "sgd", "model.activation"),
        (_mlp(10), {"name": "lsuv"}, "tanh", "sgd", ""),
    ],
    ids=["he-x2", "xavier-relu-20", "bias-1", "adam-0.5", "orthogonal-sigmoid", "lsuv-tanh"],
)
def test_a_run_names_the_knob_at_fault(tiny, model, init, activation, optim, knob):
    optimizer = {
        "sgd": {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
        "adam": {"optimizer": "adam", "lr": 0.002},
        "adam lr 0.5": {"optimizer": "adam", "lr": 0.5},
    }[optim]
    cfg = tiny(
        model={**model, "activation": activation},
        init={"name": "he_normal", **init},
        optim={**optimizer, "epochs": 100, "max_steps": 200},
    )
    d = train(cfg).diagnosis
    assert d.knob == knob, (d.verdict, d.knob, d.attribution)
    if knob:
        assert d.advice.startswith(f"change {knob} first: ")
    else:
        assert d.verdict == "healthy" and d.attribution == ""


def _snap(
    step: int, gain: float, update: float = 1e-3, layers: int = 4, **extra: float
) -> Snapshot:
    """``layers`` hidden layers whose activations' std changes ``gain`` per layer."""
    hidden = {
        f"head.fc{i}": {
            "act_std": gain**i,
            "grad_std": 1.0,
            "update_ratio": update,
            "distinct": 1.0,
            "saturated": 0.0,
            "dead": 0.0,
            **extra,
        }
        for i in range(layers)
    }
    return Snapshot(step, {**hidden, "head.out": {"act_std": 1.0, "grad_std": 1.0}})


def test_init_theory_predicts_the_per_layer_gain():
    assert predicted_gain(Setup("relu", "he_normal")) == pytest.approx(1.0)
    assert predicted_gain(Setup("leaky_relu", "he_uniform", negative_slope=0.2)) == pytest.approx(1)
    assert predicted_gain(Setup("tanh", "xavier_normal")) == pytest.approx(1.0)
    assert predicted_gain(Setup("relu", "xavier_normal")) == pytest.approx(math.sqrt(0.5))
    assert predicted_gain(Setup("sigmoid", "orthogonal")) == pytest.approx(0.25)
    assert predicted_gain(Setup("relu", "normal")) is None  # a fixed std ignores the fan-in
    measured = measured_gain(_snap(1, 2.0))
    assert measured is not None and measured[0] == pytest.approx(2.0) and measured[1] == 4


def test_the_signatures_set_the_candidates_apart():
    """The same verdict from a drift at step 1 (the init's scale, or its name when the scale
    is 1), or from a healthy start followed by large updates (the lr), or small ones (the
    activation)."""
    drifted = [_snap(1, 2.0), _snap(11, 2.0)]  # 8x over 4 layers
    assert DRIFT < 2.0**3
    scaled = attribute("dying", drifted, 0, Setup(scale=2.0))
    assert scaled is not None and scaled.knob == "init.scale"
    assert "predicts 1.00 at init.scale=1, 2.00 at 2" in scaled.evidence
    named = attribute("dying", drifted, 0, Setup(init="normal"))
    assert named is not None and named.knob == "init.name"
    steady = [_snap(1, 1.0), _snap(11, 1.0, update=10 * UPDATE_RATIO), _snap(21, 1.0)]
    fast = attribute("dying", steady, 2, Setup(lr=0.5))
    assert fast is not None and fast.knob == "optim.lr" and "try 0.05" in fast.advice
    assert "it turned at step 21" in fast.evidence
    slow = [_snap(1, 1.0), _snap(11, 1.0), _snap(21, 1.0)]
    dying = attribute("dying", slow, 2, Setup())
    assert dying is not None and dying.knob == "model.activation"
    deep = attribute("vanishing", slow, 0, Setup())
    assert deep is not None and deep.knob == "depth" and "batch_norm" in deep.advice
    diverged = attribute("exploding", slow[:1], 1, Setup(activation="leaky_relu"), True)
    assert diverged is not None and diverged.knob == "optim.lr"


def test_the_knob_travels_with_the_diagnosis():
    cfg = DiagnosticsConfig()
    dead = _snap(11, 1.0, dead=0.9)
    d = diagnose([_snap(1, 1.0), dead, dead], cfg, setup=Setup(bias=-1.0))
    assert (d.verdict, d.knob) == ("dying", "init.bias")
    assert d.advice.startswith("change init.bias first: init.bias=0; else ")
    assert f"- The knob: `init.bias`, because {d.attribution}" in d.markdown()
    assert diagnose([_snap(1, 1.0)], cfg).knob == ""
