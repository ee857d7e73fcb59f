"""The seed experiments in their reduced form: every claim's verdict, the report, MLflow."""

import pytest
from mlflow.tracking import MlflowClient

from convserve.pipelines.experiments import log_report, run_experiments, write_report

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Pooling is "usually" better, by a point or so either way (Boureau et al. 2010): the report
# states what it sees, and the test does not pin that verdict.
PINNED = [
    "symmetry",
    "vanishing",
    "exploding",
    "xavier_he",
    "compute_cost",
    "dying_relu",
    "dense_vs_cnn",
    "convolution",
    "hierarchy",
    "glorot_normalised",
]


def test_reduced_suite_reproduces_the_claims(tmp_path, sqlite_uri):
    findings = run_experiments(tmp_path / "report", quick=True)
    by_name = {f.name: f for f in findings}
    assert list(by_name) == [*PINNED[:8], "pooling", *PINNED[8:]]
    for name in PINNED:
        assert by_name[name].reproduced, (name, by_name[name].measured)
    for f in findings:
        assert f.criterion and f.measured and f.anchor
    assert by_name["xavier_he"].metrics["act_growth_ReLU + Xavier"] < 1e-3
    assert by_name["symmetry"].metrics["constant_val_accuracy"] < 0.3
    report = write_report(findings, tmp_path / "report", quick=True)
    text = report.read_text()
    assert "of 11 claims reproduced" in text
    assert text.count("**Criterion.**") == 11
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
    assert run.data.metrics["claims_reproduced"] >= 10
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
