"""One diagnosis per run: causal precedence, phases, evidence and advice (on snapshots built by
hand, where each statistic is known, and on real runs)."""

import itertools
import json

import pytest

from convserve.training.attribution import Setup
from convserve.training.config import DiagnosticsConfig
from convserve.training.configfiles import load_config
from convserve.training.diagnosis import (
    EXPLAINS,
    PRECEDENCE,
    Diagnosis,
    diagnose,
    findings,
)
from convserve.training.diagnostics import Snapshot
from convserve.training.run import train

CFG = DiagnosticsConfig()
LAYER = {"act_std": 1.0, "grad_std": 1.0, "distinct": 1.0, "saturated": 0.0, "dead": 0.0}


def snap(step: int, *verdicts: str) -> Snapshot:
    """Three hidden layers and an output whose statistics support exactly ``verdicts``."""
    first, middle, last = dict(LAYER), dict(LAYER), dict(LAYER)
    if "symmetric" in verdicts:
        middle["distinct"] = 1 / 16
    if "vanishing" in verdicts:
        first["grad_std"] = 1e-4
    if "exploding" in verdicts:
        last["act_std"] = 1e3
    if "saturated" in verdicts:
        middle["saturated"] = 0.9
    if "dying" in verdicts:
        middle["dead"] = 0.7
    layers = {"block1.conv": first, "block2.conv": middle, "head.fc1": last}
    return Snapshot(step, {**layers, "head.out": dict(LAYER)})


def test_each_statistic_gives_its_finding_with_layer_step_and_threshold():
    assert findings(snap(1), CFG) == []
    for verdict in PRECEDENCE:
        (found,) = findings(snap(7, verdict), CFG)
        assert found.verdict == verdict and found.step == 7
        assert "at step 7" in found.evidence
    (sym,) = findings(snap(1, "symmetric"), CFG)
    assert (sym.layer, sym.statistic, sym.value, sym.threshold) == (
        "block2.conv",
        "distinct",
        1 / 16,
        0.5,
    )
    (van,) = findings(snap(1, "vanishing"), CFG)
    assert (van.statistic, van.value, van.threshold) == ("grad_ratio", 1e-4, 1e-2)
    assert "block1.conv" in van.evidence and "head.fc1" in van.evidence
    assert "head.out" not in van.evidence  # the output layer is not part of the ratio


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_every_combination_gets_one_cause_and_its_consequences(size):
    for combo in itertools.combinations(PRECEDENCE, size):
        d = diagnose([snap(1, *combo)], CFG)
        (phase,) = d.phases
        assert d.verdict == phase.verdict == next(v for v in PRECEDENCE if v in combo)
        explained = {c.split(":")[0] for c in phase.consequences}
        assert explained == {v for v in combo if v in EXPLAINS.get(d.verdict, {})}
        assert len(phase.also) == len(combo) - 1 - len(explained)
        if {"vanishing", "exploding"} <= set(combo):
            assert d.verdict != "vanishing"  # never both the verdict of one phase


def test_symmetry_explains_degenerate_gradient_statistics():
    d = diagnose(
        [snap(1, "symmetric", "vanishing", "exploding")], CFG, setup=Setup(init="constant")
    )
    assert d.verdict == "symmetric"
    assert [c.split(":")[0] for c in d.consequences] == ["exploding", "vanishing"]
    assert "identical units receive identical gradients" in d.consequences[0]
    assert "break symmetry" in d.advice and "init.name=constant" in d.advice


def test_saturation_and_dead_units_explain_vanishing():
    d = diagnose([snap(1, "saturated", "vanishing")], CFG, setup=Setup(activation="sigmoid"))
    assert d.verdict == "saturated"
    assert d.consequences[0].startswith("vanishing: the gradient std at block1.conv is 0.0001")
    assert d.consequences[0].endswith("because a saturated unit passes under 0.02 of its gradient")
    d = diagnose([snap(1, "dying", "vanishing")], CFG)
    assert d.verdict == "dying" and "leaky_relu" in d.advice


def test_a_run_that_starts_exploding_and_ends_vanishing_is_told_by_phase():
    snaps = [
        snap(1, "exploding"),
        snap(51, "vanishing"),
        snap(101, "vanishing"),
        snap(151, "vanishing"),
    ]
    d = diagnose(snaps, CFG)
    assert [(p.name, p.verdict, p.steps) for p in d.phases] == [
        ("initialisation", "exploding", (1, 1)),
        ("training", "vanishing", (51, 101)),
        ("end", "vanishing", (151, 151)),
    ]
    assert d.verdict == "exploding"  # the earliest cause
    assert d.summary == "exploding at initialisation, then vanishing during training and at the end"
    assert "in 2 of 2 snapshots" in d.phases[1].evidence


def test_training_phase_needs_half_of_its_snapshots():
    middle = [snap(11, "dying"), snap(21), snap(31)]
    d = diagnose([snap(1), *middle, snap(41)], CFG)
    assert d.verdict == "healthy" and d.summary == "healthy throughout"
    d = diagnose([snap(1), snap(11, "dying"), snap(21, "dying"), snap(31), snap(41)], CFG)
    assert d.phases[1].verdict == "dying"
    assert (
        d.summary
        == "healthy at initialisation, then dying during training, then healthy at the end"
    )


def test_divergence_ends_the_run_exploding_with_its_step_and_layer():
    d = diagnose([snap(1), snap(11)], CFG, diverged=(17, "block2.conv"), setup=Setup(scale=6))
    assert [p.name for p in d.phases] == ["initialisation", "end"]
    assert d.verdict == "exploding"
    assert (
        d.evidence
        == "the loss became non-finite at step 17; the first non-finite values are in block2.conv"
    )
    assert "init.scale below 6" in d.advice
    assert diagnose([], CFG, diverged=(0, None)).summary == "exploding at the end"


def test_no_snapshot_is_unmeasured_not_healthy():
    assert diagnose([], CFG).verdict == "unmeasured"


def test_running_runs_end_at_the_latest_snapshot():
    d = diagnose([snap(1), snap(11, "dying")], CFG, running=True)
    assert d.phases[-1].name == "latest"
    assert d.summary == "healthy at initialisation, then dying at the latest snapshot"


def test_advice_follows_the_activation():
    vanishing = [snap(1, "vanishing")]
    assert (
        "He init for relu"
        in diagnose(vanishing, CFG, setup=Setup(activation="relu", init="xavier_normal")).advice
    )
    assert (
        "slope is at most 0.25"
        in diagnose(vanishing, CFG, setup=Setup(activation="sigmoid")).advice
    )
    assert (
        "xavier_normal for tanh"
        in diagnose(vanishing, CFG, setup=Setup(activation="tanh", init="normal")).advice
    )


def test_the_diagnosis_round_trips_through_json_within_a_tag():
    d = diagnose([snap(1, "exploding"), snap(2, "vanishing"), snap(3, "vanishing")], CFG)
    text = d.to_json()
    assert len(text) <= 8000
    assert Diagnosis.from_dict(json.loads(text)) == d
    assert "| training | 2-2 | vanishing |" in d.markdown()
    long = diagnose([snap(i, "exploding", "vanishing") for i in range(3)], CFG)
    assert len(long.to_json(limit=300)) <= 300 or long.to_json(limit=300).count("phases") == 1


def test_the_shipped_constant_init_config_names_one_cause(tmp_path):
    """One epoch of ``constant_init``: once "symmetric, vanishing, exploding"."""
    cfg = load_config(
        "constant_init",
        [
            "data.limit=2000",
            "diagnostics.every=5",
            "tracking.enabled=false",
            f"tracking.output_dir={tmp_path}",
            "optim.epochs=1",
        ],
    )
    d = train(cfg).diagnosis
    assert d.verdict == "symmetric" and d.summary == "symmetric throughout"
    assert [p.name for p in d.phases] == ["initialisation", "training", "end"]
    assert {p.verdict for p in d.phases} == {"symmetric"}


def test_a_healthy_20_layer_tanh_xavier_mlp_is_not_vanishing(tiny):
    """Its hidden-layer ratio is about 0.2; against the output layer it would read 0.1."""
    result = train(
        tiny(
            "model.blocks=[]",
            "model.hidden=" + str([64] * 19),
            "model.activation=tanh",
            "init.name=xavier_normal",
            "optim.max_steps=1",
        )
    )
    grad_ratio = result.snapshots[0].metrics()["diag.grad_ratio"]
    assert 0.05 < grad_ratio < 1
    assert result.diagnosis.verdict == "healthy"
