"""Does the diagnosis name the knob? Misconfigured runs, each with the configuration knob it
should name, and healthy controls for each activation, trained for a fixed step budget with
the product's own loop and diagnostics; prints each run's verdict, knob and best validation
accuracy (the misconfigured runs learn less, the controls learn), the confusion
table (rows: the knob expected, columns: the one named) and the share named right.
Target: at least 90% named right, no healthy control called unhealthy.

    .venv/bin/python benchmarks/bench_attribution.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_attribution.py --only lr  # the cases whose name has "lr"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from typing import Any

from convserve.training.attribution import KNOBS
from convserve.training.config import TrainConfig
from convserve.training.configfiles import load_config, validate_config
from convserve.training.run import train

HEALTHY = "healthy"
PLAIN = {"out_channels": 8, "pool": "none"}
CONV6 = {"blocks": [PLAIN] * 6, "hidden": [32]}
TWO = {"blocks": [{"out_channels": 16}, {"out_channels": 32}], "hidden": [64]}


def mlp(layers: int, width: int = 64) -> dict[str, Any]:
    return {"blocks": [], "hidden": [width] * layers}


SGD = {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9}
ADAM = {"optimizer": "adam", "lr": 0.002}

# (name, knob expected or "healthy", model, init, activation, optim)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], str, dict[str, Any]]] = [
    # the init's scale
    ("He x2, 6 plain conv + fc32, SGD", "init.scale", CONV6, {"scale": 2.0}, "relu", SGD),
    ("He x4, 6 plain conv + fc32, SGD", "init.scale", CONV6, {"scale": 4.0}, "relu", SGD),
    ("He x3, MLP 10, Adam", "init.scale", mlp(10), {"scale": 3.0}, "relu", ADAM),
    ("He x4, MLP 6, leaky_relu, SGD", "init.scale", mlp(6), {"scale": 4.0}, "leaky_relu", SGD),
    (
        "Xavier x4, MLP 8, tanh, SGD",
        "init.scale",
        mlp(8),
        {"name": "xavier_normal", "scale": 4.0},
        "tanh",
        SGD,
    ),
    # the init's name
    ("Xavier + ReLU, MLP 30", "init.name", mlp(30), {"name": "xavier_normal"}, "relu", SGD),
    (
        "Xavier uniform + ReLU, MLP 20",
        "init.name",
        mlp(20),
        {"name": "xavier_uniform"},
        "relu",
        ADAM,
    ),
    ("N(0, 1) + tanh, MLP 10", "init.name", mlp(10), {"name": "normal", "std": 1.0}, "tanh", SGD),
    (
        "N(0, 1) + sigmoid, MLP 3",
        "init.name",
        mlp(3),
        {"name": "normal", "std": 1.0},
        "sigmoid",
        SGD,
    ),
    ("N(0, 1) + ReLU, MLP 10", "init.name", mlp(10), {"name": "normal", "std": 1.0}, "relu", ADAM),
    (
        "N(0, 0.01) + ReLU, MLP 10",
        "init.name",
        mlp(10),
        {"name": "normal", "std": 0.01},
        "relu",
        SGD,
    ),
    (
        "constant 0.05, 2 blocks",
        "init.name",
        TWO,
        {"name": "constant", "value": 0.05},
        "relu",
        ADAM,
    ),
    ("zeros, 2 blocks", "init.name", TWO, {"name": "zeros"}, "relu", ADAM),
    (
        "constant 0.1 + tanh, MLP 3",
        "init.name",
        mlp(3),
        {"name": "constant", "value": 0.1},
        "tanh",
        SGD,
    ),
    ("U(+-0.05) + ReLU, MLP 12", "init.name", mlp(12), {"name": "uniform"}, "relu", SGD),
    # the bias
    ("bias -1, MLP 3", "init.bias", mlp(3), {"bias": -1.0}, "relu", SGD),
    ("bias -0.5, MLP 6", "init.bias", mlp(6), {"bias": -0.5}, "relu", SGD),
    ("bias -2, 6 plain conv", "init.bias", CONV6, {"bias": -2.0}, "relu", SGD),
    # the learning rate
    ("SGD lr 1, 2 blocks", "optim.lr", TWO, {}, "relu", {"optimizer": "sgd", "lr": 1.0}),
    ("SGD lr 10, 2 blocks", "optim.lr", TWO, {}, "relu", {"optimizer": "sgd", "lr": 10.0}),
    ("Adam lr 0.1, 2 blocks", "optim.lr", TWO, {}, "relu", {"optimizer": "adam", "lr": 0.1}),
    ("Adam lr 0.5, MLP 3", "optim.lr", mlp(3), {}, "relu", {"optimizer": "adam", "lr": 0.5}),
    ("SGD lr 5, leaky_relu", "optim.lr", TWO, {}, "leaky_relu", {"optimizer": "sgd", "lr": 5.0}),
    (
        "SGD lr 3, tanh + Xavier",
        "optim.lr",
        TWO,
        {"name": "xavier_normal"},
        "tanh",
        {"optimizer": "sgd", "lr": 3.0},
    ),
    # the activation
    (
        "orthogonal + sigmoid, MLP 10",
        "model.activation",
        mlp(10),
        {"name": "orthogonal"},
        "sigmoid",
        SGD,
    ),
    (
        "Xavier + sigmoid, MLP 10",
        "model.activation",
        mlp(10),
        {"name": "xavier_normal"},
        "sigmoid",
        SGD,
    ),
    (
        "PyTorch default + sigmoid, 5 plain conv",
        "model.activation",
        {"blocks": [PLAIN] * 5, "hidden": []},
        {"name": "default"},
        "sigmoid",
        SGD,
    ),
    # healthy controls, one or more per activation
    ("He + ReLU, 2 blocks", HEALTHY, TWO, {}, "relu", ADAM),
    ("He + ReLU, MLP 30", HEALTHY, mlp(30), {}, "relu", SGD),
    ("He + leaky_relu, 2 blocks", HEALTHY, TWO, {}, "leaky_relu", ADAM),
    ("He + ELU, 2 blocks", HEALTHY, TWO, {}, "elu", ADAM),
    ("He + GELU, 2 blocks", HEALTHY, TWO, {}, "gelu", ADAM),
    ("Xavier + tanh, MLP 10", HEALTHY, mlp(10), {"name": "xavier_normal"}, "tanh", SGD),
    (
        "Xavier + sigmoid, 1 hidden layer",
        HEALTHY,
        mlp(1),
        {"name": "xavier_normal"},
        "sigmoid",
        ADAM,
    ),
    ("orthogonal + ReLU, MLP 10", HEALTHY, mlp(10), {"name": "orthogonal"}, "relu", SGD),
    ("LSUV + ReLU, MLP 10", HEALTHY, mlp(10), {"name": "lsuv"}, "relu", SGD),
    ("LSUV + tanh, MLP 10", HEALTHY, mlp(10), {"name": "lsuv"}, "tanh", SGD),
    ("PyTorch default + ReLU, 2 blocks", HEALTHY, TWO, {"name": "default"}, "relu", ADAM),
]
# the shipped configs, on their own data and settings, at the same step budget
SHIPPED = {
    "default": HEALTHY,
    "xavier_tanh": HEALTHY,
    "constant_init": "init.name",
    "large_weights": "init.scale",
    "deep_sigmoid": "model.activation",
}


def outcome(cfg: TrainConfig) -> tuple[str, str, float]:
    """(verdict, knob named or "healthy", best validation accuracy) of training ``cfg``."""
    result = train(cfg)
    d = result.diagnosis
    return d.verdict, d.knob or HEALTHY, result.metrics.get("best_val_accuracy", 0.0)


def run_case(
    model: dict[str, Any], init: dict[str, Any], activation: str, optim: dict[str, Any], steps: int
) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return outcome(
            validate_config(
                {
                    "seed": 0,
                    "device": "cpu",
                    "data": {"name": "digits", "batch_size": 64},
                    "model": {**model, "activation": activation},
                    "init": {"name": "he_normal", **init},
                    "optim": {**optim, "epochs": 100, "max_steps": steps},
                    "diagnostics": {"every": 10},
                    "tracking": {"enabled": False, "output_dir": tmp},
                }
            )
        )


def run_shipped(name: str, steps: int) -> tuple[str, str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["device=cpu", "tracking.enabled=false", f"tracking.output_dir={tmp}"]
        overrides += [f"optim.max_steps={steps}", "diagnostics.every=10"]
        return outcome(load_config(name, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []  # (name, expected, verdict, named)
    start = time.perf_counter()
    print(
        "| run | expected | verdict | knob named | best val acc |\n| --- | --- | --- | --- | ---: |"
    )
    todo: list[tuple[str, str, Any]] = [
        (name, want, (model, init, act, optim)) for name, want, model, init, act, optim in CASES
    ] + [(f"shipped {name}", want, name) for name, want in SHIPPED.items()]
    for name, want, what in todo:
        if args.only and args.only not in name:
            continue
        if isinstance(what, str):
            verdict, named, accuracy = run_shipped(what, args.steps)
        else:
            verdict, named, accuracy = run_case(*what, args.steps)
        rows.append((name, want, verdict, named))
        mark = "" if named == want else " (differs)"
        print(f"| {name} | {want} | {verdict} | {named}{mark} | {accuracy:.3f} |", flush=True)
    labels = [k for k in (*KNOBS, HEALTHY) if any(k in (r[1], r[3]) for r in rows)]
    counts = Counter((r[1], r[3]) for r in rows)
    print("\nconfusion (rows: expected, columns: named)\n")
    print("| expected | " + " | ".join(labels) + " |")
    print("| --- |" + " ---: |" * len(labels))
    for want in labels:
        cells = " | ".join(str(counts[(want, got)] or "") for got in labels)
        print(f"| {want} | {cells} |")
    right = sum(r[1] == r[3] for r in rows)
    false_alarms = sum(r[1] == HEALTHY and r[3] != HEALTHY for r in rows)
    controls = sum(r[1] == HEALTHY for r in rows)
    print(
        f"\n{right} of {len(rows)} named right ({right / len(rows):.0%}, target >= 90%); "
        f"{false_alarms} of {controls} healthy controls called unhealthy (target 0); "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
