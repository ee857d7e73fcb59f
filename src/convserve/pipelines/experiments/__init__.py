"""The seed experiments: each lecture claim as a small seeded CPU experiment, a stated
criterion, a measured figure and a verdict; a Markdown report with figures, written to a
folder and logged to one MLflow parent run.

Every experiment uses the product's own builder, initialisers, activations, data sets,
training loop and diagnostics.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convserve.pipelines.experiment_names import REGISTRY
from convserve.training.config import TrainConfig
from convserve.training.configfiles import validate_config

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What an experiment may use: its figure folder and the quick/full switch."""

    folder: Path
    runs: Path  # checkpoints of the experiment's training runs (not part of the report)
    quick: bool = False
    seed: int = 0

    def steps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def config(self, **sections: Any) -> TrainConfig:
        """A training config with tracking and plots off (the report is tracked instead)."""
        base: dict[str, Any] = {
            "seed": self.seed,
            "device": "cpu",
            "data": {"name": "digits", "batch_size": 64},
            "diagnostics": {"every": 10},
            "tracking": {"enabled": False, "output_dir": str(self.runs)},
        }
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return validate_config(base)


@dataclass
class Finding:
    name: str
    title: str
    claim: str  # the claim in one sentence, quoted from its source where it has one
    anchor: str  # the paper or derivation the criterion comes from
    criterion: str  # what must hold for each verdict, with the reason for the threshold
    measured: str  # the figures, in words
    reproduced: bool  # the claim as stated, whole
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # where the criterion says so, PARTLY: some of the claim holds, and ``measured`` says
    # which part does not
    partly: bool = False
    setup: str = ""  # the networks, data, seeds and step budget
    effect: str = ""  # the headline effect size with its uncertainty, one line

    @property
    def verdict(self) -> str:
        if self.reproduced:
            return REPRODUCED
        return PARTLY if self.partly else NOT_REPRODUCED


Experiment = Callable[[Context], Finding]
REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly reproduced", "not reproduced"


def tally(findings: list[Finding]) -> str:
    """ "9 of 11 claims reproduced, 1 partly, 1 not"."""
    counts = {v: sum(f.verdict == v for f in findings) for v in (PARTLY, NOT_REPRODUCED)}
    text = f"{sum(f.reproduced for f in findings)} of {len(findings)} claims reproduced"
    if counts[PARTLY]:
        text += f", {counts[PARTLY]} partly"
    if counts[NOT_REPRODUCED]:
        text += f", {counts[NOT_REPRODUCED]} not"
    return text


Interval = tuple[float, float, float]  # (value, low, high)


def mean_interval(values: list[float], level: float = 0.95) -> Interval:
    """(mean, low, high): the mean of ``values`` and its ``level`` confidence interval from
    Student's t (the seeds' spread); the interval is the mean alone for one value."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + level) / 2, len(data) - 1) * data.std(ddof=1) / len(data) ** 0.5)
    return mean, mean - half, mean + half


def ratio_interval(values: list[float], level: float = 0.95) -> Interval:
    """(geometric mean, low, high) of positive ratios: ``mean_interval`` on their logs, so a
    ratio's interval is symmetric in factors (x2 and /2), not in differences."""
    mean, low, high = mean_interval([math.log(v) for v in values], level)
    return math.exp(mean), math.exp(low), math.exp(high)


def proportion_interval(hits: int, n: int, level: float = 0.95) -> Interval:
    """(share, low, high): ``hits`` of ``n`` and Wilson's score interval, which stays inside
    [0, 1] and is not empty at 0 or n hits (where the normal approximation is)."""
    from scipy import stats

    z = float(stats.norm.ppf((1 + level) / 2))
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return share, max(0.0, centre - half), min(1.0, centre + half)


def interval(values: Interval, spec: str = ".2f", unit: str = "") -> str:
    """ "0.95 (95% CI [0.93, 0.97])" from (value, low, high); ``unit`` follows the value."""
    value, low, high = values
    return f"{value:{spec}}{unit} (95% CI [{low:{spec}}, {high:{spec}}])"


EXPERIMENTS: dict[str, Experiment] = {}  # filled as REGISTRY's modules are imported


def experiment(name: str) -> Callable[[Experiment], Experiment]:
    """Register ``fn`` as the experiment ``name``, which ``REGISTRY`` must list with the
    function's module."""

    def register(fn: Experiment) -> Experiment:
        module = fn.__module__.rsplit(".", 1)[-1]
        if REGISTRY.get(name) != module:
            raise ValueError(f"experiment {name!r} of {module}: REGISTRY does not list it so")
        EXPERIMENTS[name] = fn
        return fn

    return register


def run_experiments(
    folder: Path,
    only: list[str] | None = None,
    quick: bool = False,
    on_done: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    names = only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {', '.join(unknown)}; choose from: {', '.join(REGISTRY)}"
        )
    for module in dict.fromkeys(REGISTRY[n] for n in names):  # importing registers them
        importlib.import_module(f"{__name__}.{module}")
    folder.mkdir(parents=True, exist_ok=True)
    findings = []
    runs = Path(tempfile.mkdtemp(prefix="convserve-experiments-"))
    for name in names:
        start = time.perf_counter()
        (folder / name).mkdir(parents=True, exist_ok=True)
        finding = EXPERIMENTS[name](Context(folder / name, runs / name, quick))
        finding.seconds = time.perf_counter() - start
        findings.append(finding)
        if on_done is not None:
            on_done(finding)
    shutil.rmtree(runs, ignore_errors=True)
    return findings


def write_report(findings: list[Finding], folder: Path, quick: bool) -> Path:
    lines = [
        "# convserve seed experiments",
        "",
        f"Mode: {'quick (reduced)' if quick else 'full'}. {tally(findings)}.",
        "",
        "| # | claim | verdict | effect |",
        "| --- | --- | --- | --- |",
    ]
    for i, f in enumerate(findings, 1):
        verdict = f.verdict if f.reproduced else f"**{f.verdict}**"
        cell = (f.effect or f.measured).splitlines()[0].replace("|", "\\|")
        lines.append(f"| {i} | {f.title} | {verdict} | {cell} |")
    for i, f in enumerate(findings, 1):
        lines += [
            "",
            f"## {i}. {f.title}",
            "",
            f"**Claim.** {f.claim}",
            "",
            f"**Anchor.** {f.anchor}",
            "",
            f"**Setup.** {f.setup}",
            "",
            f"**Criterion.** {f.criterion}",
            "",
            f"**Measured.** {f.measured}",
            "",
            f"**Effect.** {f.effect}",
            "",
            f"**Verdict.** {f.verdict} ({f.seconds:.1f} s)",
        ]
        lines += [f"\n![{p.stem}]({p.relative_to(folder)})" for p in f.figures]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_report(
    findings: list[Finding],
    folder: Path,
    tracking_uri: str | None,
    experiment_name: str = "convserve-experiments",
) -> str:
    """One MLflow parent run holding the report, the figures and each claim's figures."""
    from convserve.training.tracking import get_or_create_experiment, mlflow_client

    client = mlflow_client(tracking_uri)
    run = client.create_run(
        get_or_create_experiment(client, experiment_name),
        run_name="seed-experiments",
        tags={"convserve.kind": "experiments"},
    )
    run_id = run.info.run_id
    for f in findings:
        client.set_tag(run_id, f"claim.{f.name}", f.verdict)
        for key, value in f.metrics.items():
            # MLflow names allow letters, digits, "_-. :/" only ("tanh + Xavier" has a "+").
            name = re.sub(r"[^\w\-. :/]", "_", f"{f.name}.{key}")
            client.log_metric(run_id, name, float(value))
    client.log_metric(run_id, "claims_reproduced", float(sum(f.reproduced for f in findings)))
    client.log_metric(run_id, "claims_partly", float(sum(f.verdict == PARTLY for f in findings)))
    client.log_artifacts(run_id, str(folder), "report")
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)
