"""The figures behind the diagnostics' thresholds: the hidden-layer gradient ratio, the
activation growth, the largest saturated and dead shares and the smallest distinct share of a
hidden layer, and the diagnosis at initialisation of networks whose behaviour is known
(healthy variance-preserving inits, and the failing cases of the lecture), one training step
each on the digits data. docs/diagnostics.md quotes this table.

    .venv/bin/python benchmarks/diagnostic_thresholds.py
"""

from __future__ import annotations

from typing import Any

from convserve.training.attribution import Setup
from convserve.training.config import DiagnosticsConfig
from convserve.training.configfiles import validate_config
from convserve.training.diagnosis import diagnose
from convserve.training.diagnostics import hidden_layers, ratios
from convserve.training.run import train

PLAIN = {"out_channels": 8, "pool": "none"}
TWO_BLOCKS = {"blocks": [{"out_channels": 16}, {"out_channels": 32}], "hidden": [64]}
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    # (name, expected, model, init, activation)
    (
        "tanh + Xavier, MLP 20 layers",
        "healthy",
        {"blocks": [], "hidden": [64] * 19},
        {"name": "xavier_normal"},
        "tanh",
    ),
    (
        "ReLU + He, MLP 30 layers",
        "healthy",
        {"blocks": [], "hidden": [64] * 29},
        {"name": "he_normal"},
        "relu",
    ),
    ("ReLU + He, 2 conv blocks + fc64", "healthy", TWO_BLOCKS, {"name": "he_normal"}, "relu"),
    (
        "ReLU + He, 6 plain conv + fc32",
        "healthy",
        {"blocks": [PLAIN] * 6, "hidden": [32]},
        {"name": "he_normal"},
        "relu",
    ),
    ("ReLU + PyTorch default, 2 blocks", "healthy", TWO_BLOCKS, {"name": "default"}, "relu"),
    (
        "tanh + standard U(1/sqrt n), 5x1000",
        "healthy",
        {"blocks": [], "hidden": [1000] * 5},
        {"name": "default"},
        "tanh",
    ),
    (
        "tanh + normalised (Xavier), 5x1000",
        "healthy",
        {"blocks": [], "hidden": [1000] * 5},
        {"name": "xavier_uniform"},
        "tanh",
    ),
    (
        "ReLU + He x2, 6 plain conv + fc32",
        "healthy",
        {"blocks": [PLAIN] * 6, "hidden": [32]},
        {"name": "he_normal", "scale": 2.0},
        "relu",
    ),
    (
        "ReLU + Xavier, MLP 30 layers",
        "vanishing",
        {"blocks": [], "hidden": [64] * 29},
        {"name": "xavier_normal"},
        "relu",
    ),
    (
        "sigmoid + standard, 5 plain conv",
        "vanishing",
        {"blocks": [PLAIN] * 5, "hidden": []},
        {"name": "default"},
        "sigmoid",
    ),
    (
        "sigmoid + Xavier, MLP 10 layers",
        "vanishing",
        {"blocks": [], "hidden": [64] * 9},
        {"name": "xavier_normal"},
        "sigmoid",
    ),
    (
        "sigmoid + N(0, 0.01), 20 layers",
        "vanishing",
        {"blocks": [PLAIN] * 4, "hidden": [32] * 15},
        {"name": "normal", "std": 0.01},
        "sigmoid",
    ),
    (
        "ReLU + He x4, 6 plain conv + fc32",
        "exploding",
        {"blocks": [PLAIN] * 6, "hidden": [32]},
        {"name": "he_normal", "scale": 4.0},
        "relu",
    ),
    (
        "ReLU + N(0, 1), MLP 10 layers",
        "exploding",
        {"blocks": [], "hidden": [64] * 9},
        {"name": "normal", "std": 1.0},
        "relu",
    ),
    (
        "tanh + N(0, 1), MLP 10 layers",
        "exploding",
        {"blocks": [], "hidden": [64] * 9},
        {"name": "normal", "std": 1.0},
        "tanh",
    ),
    (
        "ReLU + constant 0.05, 2 blocks",
        "symmetric",
        TWO_BLOCKS,
        {"name": "constant", "value": 0.05},
        "relu",
    ),
    (
        "ReLU + He, bias -1, MLP 3 x 64",
        "dying",
        {"blocks": [], "hidden": [64] * 3},
        {"name": "he_normal", "bias": -1.0},
        "relu",
    ),
    (
        "sigmoid + N(0, 1), MLP 3 x 64",
        "saturated",
        {"blocks": [], "hidden": [64] * 3},
        {"name": "normal", "std": 1.0},
        "sigmoid",
    ),
]


def main() -> None:
    thresholds = DiagnosticsConfig()
    print(
        f"thresholds: vanishing grad_ratio < {thresholds.vanishing_ratio:g}, exploding "
        f"grad_ratio or act_growth > {thresholds.exploding_ratio:g}\n"
    )
    print(
        f"saturated share > {thresholds.saturated_fraction:g}, dead share > "
        f"{thresholds.dead_fraction:g}, distinct share <= {thresholds.symmetric_distinct:g} "
        "(the largest, largest and smallest over the hidden layers)\n"
    )
    print(
        "| network | grad_ratio | act_growth | saturated | dead | distinct | diagnosis at init "
        "| expected |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    wrong = 0
    for name, expected, model, init, activation in CASES:
        cfg = validate_config(
            {
                "seed": 0,
                "device": "cpu",
                "data": {"name": "digits", "batch_size": 64},
                "model": {**model, "activation": activation},
                "init": init,
                "optim": {"optimizer": "sgd", "lr": 0.01, "max_steps": 1},
                "diagnostics": {"every": 10},
                "tracking": {"enabled": False, "output_dir": "/tmp/convserve-thresholds"},
            }
        )
        result = train(cfg)
        first = result.snapshots[0]
        r = ratios(first)
        hidden = [first.layers[k] for k in hidden_layers(first)]
        saturated = max((layer.get("saturated", 0.0) for layer in hidden), default=0.0)
        dead = max((layer.get("dead", 0.0) for layer in hidden), default=0.0)
        distinct = min((layer.get("distinct", 1.0) for layer in hidden), default=1.0)
        verdict = diagnose(
            result.snapshots[:1],
            cfg.diagnostics,
            setup=Setup.of(cfg),
        ).verdict
        wrong += verdict != expected
        print(
            f"| {name} | {r['grad_ratio']:.3g} | {r['act_growth']:.3g} | {saturated:.2f} | "
            f"{dead:.2f} | {distinct:.2f} | {verdict} | "
            f"{expected}{'' if verdict == expected else ' (differs)'} |",
            flush=True,
        )
    print(f"\n{len(CASES) - wrong} of {len(CASES)} diagnosed as expected")


if __name__ == "__main__":
    main()
