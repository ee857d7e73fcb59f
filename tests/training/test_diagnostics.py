"""Diagnostics on cases whose answer is known (constant -> symmetric, deep sigmoid with small
weights -> vanishing, several times the He scale -> exploding, He + ReLU -> healthy)."""

import math

import torch

from convserve.training.diagnostics import (
    Snapshot,
    distinct_fraction,
    find_nonfinite,
    ratios,
)
from convserve.training.run import train

SIGMOID_20 = [
    "model.activation=sigmoid",
    "init.name=normal",
    "init.std=0.01",
    "model.blocks=" + str([{"out_channels": 8, "pool": "none"}] * 4),
    "model.hidden=" + str([32] * 15),  # 4 conv + 15 hidden + output = 20 weight layers
    "optim.optimizer=sgd",
    "optim.lr=0.1",
    "optim.max_steps=30",
]
DEEP_RELU = [
    "model.blocks=" + str([{"out_channels": 8, "pool": "none"}] * 3),
    "model.hidden=[32, 32]",
    "optim.optimizer=sgd",
    "optim.lr=0.0001",
    "optim.max_steps=20",
]


def test_constant_init_is_symmetric(tiny):
    result = train(tiny("init.name=constant", "init.value=0.05", "optim.max_steps=30"))
    assert result.diagnosis.verdict == "symmetric"
    assert result.diagnosis.summary == "symmetric throughout"
    assert "init.name=he_normal" in result.diagnosis.advice
    last = result.snapshots[-1].layers
    assert last["block1.conv"]["distinct"] == 1 / 8  # all eight filters are still one
    assert last["head.out"]["distinct"] == 1.0  # the output rows get different targets


def test_deep_sigmoid_with_small_weights_vanishes(tiny):
    result = train(tiny(*SIGMOID_20))
    assert len(result.snapshots[0].layers) == 20
    assert result.diagnosis.verdict == "vanishing"
    assert "head.fc15" in result.diagnosis.evidence  # the last hidden layer, not the output
    first = result.snapshots[0].layers
    # the back-propagated gradient shrinks layer by layer (Glorot & Bengio 2010, Fig. 7)
    stds = [s["grad_std"] for s in first.values()]
    assert stds[0] < stds[10] < stds[-1]
    assert ratios(result.snapshots[0])["grad_ratio"] < 1e-3


def test_weights_several_times_the_he_scale_explode(tiny):
    result = train(tiny(*DEEP_RELU, "init.scale=4"))
    assert result.status == "finished"
    assert result.diagnosis.verdict == "exploding"
    assert "init.scale below 4" in result.diagnosis.advice
    assert ratios(result.snapshots[0])["act_growth"] > 100


def test_he_relu_is_healthy(tiny):
    result = train(tiny("optim.max_steps=40"))
    assert result.diagnosis.verdict == "healthy"
    same_depth = train(tiny(*DEEP_RELU))  # the exploding network at the right scale
    assert same_depth.diagnosis.verdict == "healthy"
    assert ratios(same_depth.snapshots[0])["act_growth"] < 10


def test_divergence_ends_the_run_with_step_and_layer(tiny):
    result = train(
        tiny(
            *DEEP_RELU[:2],
            "init.scale=6",
            "optim.optimizer=sgd",
            "optim.lr=0.1",
            "optim.max_steps=30",
        )
    )
    assert result.status == "diverged"
    assert result.diagnosis.verdict == "exploding"
    assert result.diagnosis.phases[-1].evidence.startswith("the loss became non-finite")
    assert "diverged at step" in result.message
    assert "first non-finite values in" in result.message


def test_dead_units_are_counted_per_channel(tiny):
    from convserve.training.diagnostics import Diagnostics
    from convserve.training.model import build_model

    cfg = tiny()
    model = build_model(cfg.model, 1, (8, 8), 10)
    with torch.no_grad():
        model.block1.conv.bias[:4] = -100.0  # four of eight channels can never fire
    diag = Diagnostics(model, cfg.diagnostics)
    with diag.measure():
        model(torch.rand(16, 1, 8, 8)).sum().backward()
    diag.before_step()
    snap = diag.after_step(1)
    assert snap.layers["block1.conv"]["dead"] == 0.5
    assert snap.layers["block1.conv"]["weight_grad_norm"] > 0
    diag.close()


def test_distinct_fraction():
    torch.manual_seed(0)
    w = torch.randn(10, 4, 3, 3)
    assert distinct_fraction(w) == 1.0
    w[3] = w[1]
    w[7] = w[1] * (1 + 1e-5)
    assert distinct_fraction(w) == 0.8
    assert distinct_fraction(torch.ones(16, 20)) == 1 / 16
    assert distinct_fraction(torch.zeros(8, 5)) == 1 / 8
    assert distinct_fraction(torch.stack([torch.ones(5), 2 * torch.ones(5)])) == 1.0  # norms


def test_distinct_fraction_at_width_1024_counts_every_copy():
    """1,024 rows of 1,024 (the width the statistic must stay cheap at), a hundred of them
    copies of others (and copies of copies)."""
    torch.manual_seed(1)
    w = torch.randn(1024, 1024)
    copies = torch.randperm(1024)[:100]
    for i, row in enumerate(copies.tolist()):
        w[row] = w[(row + 1 + i) % 1024]
    originals = {tuple(r) for r in w.numpy().round(6).tolist()}
    assert distinct_fraction(w) == len(originals) / 1024


def test_find_nonfinite_names_the_first_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert find_nonfinite(model, torch.rand(2, 4)) is None
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    assert find_nonfinite(model, torch.rand(2, 4)) == "2"  # a parameter, found first
    with torch.no_grad():
        model[2].weight[0, 0] = 0.0
    assert find_nonfinite(model, torch.full((2, 4), math.nan)) == "0"  # else the first output


def test_snapshot_metrics_are_flat():
    snap = Snapshot(
        5,
        {
            "block1.conv": {"act_std": 1.0, "grad_std": 2.0},
            "head.out": {"act_std": 1.0, "grad_std": 4.0},
        },
    )
    metrics = snap.metrics()
    assert metrics["diag.block1.conv.grad_std"] == 2.0
    assert metrics["diag.grad_ratio"] == 1.0  # one hidden layer: no depth to vanish across


def test_ratios_compare_the_hidden_layers_not_the_output():
    snap = Snapshot(
        1,
        {
            "block1.conv": {"act_std": 1.0, "grad_std": 0.2},
            "head.fc1": {"act_std": 3.0, "grad_std": 1.0},
            "head.out": {"act_std": 9.0, "grad_std": 100.0},
        },
    )
    assert ratios(snap) == {"grad_ratio": 0.2, "act_growth": 3.0}
