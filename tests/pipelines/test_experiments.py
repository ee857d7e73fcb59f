"""The seed experiments in their reduced form: every claim's verdict, the report, MLflow."""

import pytest
from mlflow.tracking import MlflowClient

from convserve.pipelines.experiments import log_report, run_experiments, write_report

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Pooling is "usually" better, by a point or so either way (Boureau et al. 2010), and what
# training adds to the hierarchy's probes is a few points with 3 seeds: the report states what
# it sees, and the test does not pin those verdicts. Nor that of compute_cost, which is a
# timing: on a machine whose other core is busy (the other test process) its ratios move.
ORDER = [  # the report's
    "symmetry",
    "vanishing",
    "exploding",
    "xavier_he",
    "compute_cost",
    "dying_relu",
    "dense_vs_cnn",
    "convolution",
    "pooling",
    "hierarchy",
    "glorot_normalised",
]
PINNED = [n for n in ORDER if n not in ("compute_cost", "pooling", "hierarchy")]


def test_reduced_suite_reproduces_the_claims(tmp_path, sqlite_uri):
    findings = run_experiments(tmp_path / "report", quick=True)
    by_name = {f.name: f for f in findings}
    assert list(by_name) == ORDER
    for name in PINNED:
        assert by_name[name].reproduced, (name, by_name[name].measured)
    for f in findings:
        assert f.criterion and f.measured and f.anchor and f.setup and f.effect
        # a quote where a paper states the claim
        if f.name != "compute_cost":
            assert f.claim.count('"') >= 2, f.claim
        assert "Reproduced" in f.criterion or "Two verdicts" in f.criterion, f.name
    # the effects carry their uncertainty wherever seeds matter
    for name in ("vanishing", "exploding", "dense_vs_cnn", "pooling", "hierarchy"):
        assert "95% CI" in by_name[name].effect, by_name[name].effect
    assert "3 seeds" in by_name["dense_vs_cnn"].setup
    # the timing is measured and stated, whatever its verdict on this machine
    cost = by_name["compute_cost"]
    assert set(cost.metrics) == {
        f"{k}_over_relu_{size}" for k in ("sigmoid", "tanh") for size in ("cache", "memory")
    }
    assert all(v > 0 for v in cost.metrics.values())
    assert "sigmoid" in cost.effect and "95% CI" in cost.effect, cost.effect
    assert by_name["xavier_he"].metrics["act_growth_ReLU + Xavier"] < 1e-3
    assert by_name["symmetry"].metrics["constant_val_accuracy"] < 0.3
    report = write_report(findings, tmp_path / "report", quick=True)
    text = report.read_text()
    assert "of 11 claims reproduced" in text
    for section in ("Claim", "Setup", "Criterion", "Measured", "Effect", "Verdict"):
        assert text.count(f"**{section}.**") == 11, section
    for figure in (
        "vanishing/gradient_by_depth.png",
        "exploding/gradient_by_scale.png",
        "xavier_he/xavier_he.png",
        "dying_relu/born_dead.png",
        "glorot_normalised/normalised_init.png",
    ):
        assert (tmp_path / "report" / figure).exists(), figure
    # healthy controls beside the failing cases, and the measured quantities the claims name
    m = {k: v for f in findings for k, v in f.metrics.items()}
    assert (
        m["grad_ratio_ReLU + He, 10 layers"]
        > 0.1
        > 0.01
        > m["grad_ratio_sigmoid + standard, 10 layers"]
    )
    assert by_name["dense_vs_cnn"].metrics["dense_permuted_max_abs_diff"] < 1e-5
    assert m["born_dead_w2_d40"] > m["born_dead_w2_d5"]
    run_id = log_report(findings, tmp_path / "report", sqlite_uri)
    run = MlflowClient(sqlite_uri).get_run(run_id)
    assert run.data.tags["claim.symmetry"] == "reproduced"
    reproduced = sum(f.reproduced for f in findings)
    assert run.data.metrics["claims_reproduced"] == reproduced >= len(PINNED)
    artifacts = {a.path for a in MlflowClient(sqlite_uri).list_artifacts(run_id, "report")}
    assert "report/report.md" in artifacts


def test_only_runs_one_and_unknown_names_fail(tmp_path):
    findings = run_experiments(tmp_path, only=["convolution"], quick=True)
    assert [f.name for f in findings] == ["convolution"] and findings[0].reproduced
    with pytest.raises(ValueError, match="choose from: symmetry"):
        run_experiments(tmp_path, only=["nope"], quick=True)


def test_a_claim_reproduced_in_part_is_reported_as_such(tmp_path):
    """Three verdicts: the report's count, table and section say which, and a claim
    reproduced in part is not counted as reproduced."""
    from convserve.pipelines.experiments import Finding, tally

    def finding(name: str, reproduced: bool, partly: bool = False) -> Finding:
        return Finding(name, name.title(), "c", "a", "k", f"{name} measured", reproduced,
                       partly=partly)  # fmt: skip

    findings = [finding("one", True), finding("two", False, partly=True), finding("three", False)]
    assert [f.verdict for f in findings] == ["reproduced", "partly reproduced", "not reproduced"]
    assert tally(findings) == "1 of 3 claims reproduced, 1 partly, 1 not"
    text = write_report(findings, tmp_path, quick=True).read_text()
    assert "1 of 3 claims reproduced, 1 partly, 1 not." in text
    assert "| 2 | Two | **partly reproduced** | two measured |" in text
    assert "**Verdict.** partly reproduced" in text


def test_intervals_for_shares_and_ratios():
    """Wilson's interval for a share (known values), and a ratio's interval symmetric in
    factors."""
    from convserve.pipelines.experiments import interval, proportion_interval, ratio_interval

    share, low, high = proportion_interval(0, 10)
    assert share == 0.0 and low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    share, low, high = proportion_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    mean, low, high = ratio_interval([2.0, 8.0, 4.0])
    assert mean == pytest.approx(4.0) and low * high == pytest.approx(16.0)
    assert low < 4.0 < high
    assert interval((1.5, 1.0, 2.0), ".1f", " points") == "1.5 points (95% CI [1.0, 2.0])"
