"""One diagnosis per run, read from the diagnostics' snapshots: the cause, its evidence, what
follows from it, and what to change.

Each snapshot yields findings (a verdict with the layer, statistic, step and threshold that
triggered it). Findings are grouped by phase (at initialisation: the first snapshot; during
training: the snapshots between, where a finding must hold in at least half of them; at the
end: the last snapshot, or the divergence). In each phase the finding of highest precedence
is the phase's verdict and the findings it explains are its consequences:

- ``symmetric`` explains everything else: identical units receive identical gradients, so
  the layer's statistics describe one unit copied, whatever they say;
- ``exploding`` explains ``saturated``, ``dying`` and ``vanishing``: grown pre-activations push
  saturating units onto their asymptotes and ReLU units far below zero;
- ``saturated`` and ``dying`` explain ``vanishing``: a saturated unit passes under 0.02 of its
  gradient, a dead unit none.

So vanishing and exploding are never both the verdict of one phase. The run's diagnosis is
the verdict of its earliest unhealthy phase (a cause comes before its effects); the other
phases are reported beside it ("exploding at initialisation, vanishing at the end").
docs/diagnostics.md gives each statistic, threshold and the figures behind them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from convserve.training.activations import SATURATING
from convserve.training.attribution import Setup, attribute
from convserve.training.config import DiagnosticsConfig
from convserve.training.diagnostics import Snapshot, hidden_layers, ratios

# Highest precedence first; "healthy" when nothing is found.
PRECEDENCE = ("symmetric", "exploding", "saturated", "dying", "vanishing")
VERDICTS = (*PRECEDENCE, "healthy", "unmeasured")  # unmeasured: no snapshot was taken
EXPLAINS: dict[str, dict[str, str]] = {
    "symmetric": {
        v: "identical units receive identical gradients, so the layer's statistics describe "
        "one unit copied"
        for v in ("exploding", "saturated", "dying", "vanishing")
    },
    "exploding": {
        "saturated": "grown pre-activations push saturating units onto their asymptotes",
        "dying": "grown pre-activations push ReLU units far below zero",
        "vanishing": "the gradient's scale follows from the activations' overflow",
    },
    "saturated": {"vanishing": "a saturated unit passes under 0.02 of its gradient"},
    "dying": {"vanishing": "a dead unit passes no gradient"},
}


@dataclass(frozen=True)
class Finding:
    """One verdict with what triggered it: ``statistic`` of ``layer`` was ``value`` at
    ``step``, beyond ``threshold``."""

    verdict: str
    statistic: str
    value: float
    threshold: float
    step: int
    layer: str | None = None
    evidence: str = ""


@dataclass(frozen=True)
class Phase:
    name: str  # initialisation, training, end (or latest, while the run goes on)
    steps: tuple[int, int]  # first and last snapshot step of the phase
    verdict: str
    evidence: str  # the verdict's evidence in words ("" when healthy)
    consequences: list[str] = field(default_factory=list)  # "vanishing: <evidence>, because <why>"
    also: list[str] = field(default_factory=list)  # findings the verdict does not explain


@dataclass(frozen=True)
class Diagnosis:
    verdict: str  # the cause: one of VERDICTS
    summary: str  # the verdict by phase, in a line
    evidence: str
    advice: str
    consequences: list[str]
    phases: list[Phase]
    knob: str = ""  # the configuration knob most likely responsible (attribution.KNOBS)
    attribution: str = ""  # the evidence that separates it from the other candidates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnosis:
        phases = [Phase(**{**p, "steps": tuple(p["steps"])}) for p in data.get("phases", [])]
        return cls(**{**data, "phases": phases})

    def to_json(self, limit: int = 8000) -> str:
        """Compact JSON within ``limit`` characters (MLflow's tag size): the phases' other
        findings, then the phases, are left out of a diagnosis too long for it."""
        data = self.to_dict()
        text = json.dumps(data, separators=(",", ":"))
        if len(text) > limit:
            data["phases"] = [{**p, "also": []} for p in data["phases"]]
            text = json.dumps(data, separators=(",", ":"))
        if len(text) > limit:
            text = json.dumps({**data, "phases": []}, separators=(",", ":"))
        return text

    def markdown(self) -> str:
        """The run page's description in MLflow."""
        lines = [f"**Diagnosis: {self.verdict}** ({self.summary})", ""]
        if self.evidence:
            lines += [f"- Evidence: {self.evidence}"]
        if self.knob:
            lines += [f"- The knob: `{self.knob}`, because {self.attribution}"]
        lines += [f"- Consequence: {c}" for c in self.consequences]
        if self.advice:
            lines += [f"- Advice: {self.advice}"]
        lines += ["", "| phase | steps | verdict | evidence |", "| --- | --- | --- | --- |"]
        for p in self.phases:
            lines.append(f"| {p.name} | {p.steps[0]}-{p.steps[1]} | {p.verdict} | {p.evidence} |")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class _Reading:
    """One snapshot as the rules read it: its hidden layers (first to last) and their
    ratios."""

    snap: Snapshot
    cfg: DiagnosticsConfig
    hidden: dict[str, dict[str, float]]
    ratios: dict[str, float]

    @property
    def step(self) -> int:
        return self.snap.step

    @property
    def ends(self) -> tuple[str, str]:
        names = list(self.hidden)
        return names[0], names[-1]


Rule = Callable[[_Reading], "Finding | None"]
# verdict -> the rule that finds it, in the order findings are reported; which one explains
# which is PRECEDENCE's order
RULES: dict[str, Rule] = {}


def rule(verdict: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[verdict] = fn
        return fn

    return register


@rule("symmetric")
def _symmetric(r: _Reading) -> Finding | None:
    """Too few of a layer's units (filters or weight rows) are distinct."""
    worst = min(r.hidden, key=lambda k: r.hidden[k].get("distinct", 1.0))
    share, limit = r.hidden[worst].get("distinct", 1.0), r.cfg.symmetric_distinct
    if not share <= limit:  # NaN included
        return None
    return Finding(
        "symmetric",
        "distinct",
        share,
        limit,
        r.step,
        worst,
        f"only {share:.1%} of {worst}'s units (filters or weight rows) are distinct "
        f"(at most {limit:.0%} is symmetric) at step {r.step}",
    )


@rule("exploding")
def _exploding(r: _Reading) -> Finding | None:
    """A statistic is not finite, or the activations grow (or the gradients shrink towards
    the output) beyond the ratio."""
    bad = [
        (layer, k)
        for layer, s in r.snap.layers.items()
        for k, v in s.items()
        if not math.isfinite(v)
    ]
    if bad:
        layer, key = bad[0]
        evidence = f"{layer}'s {key} is not finite at step {r.step}"
        return Finding("exploding", key, math.inf, math.inf, r.step, layer, evidence)
    limit, (first, last) = r.cfg.exploding_ratio, r.ends
    growth, grad = r.ratios["act_growth"], r.ratios["grad_ratio"]
    if not (growth > limit or grad > limit):
        return None
    key = "act_growth" if growth >= grad else "grad_ratio"
    what = {
        "act_growth": f"the activation std grows {_fmt(growth)}x from {first} to {last}",
        "grad_ratio": f"the gradient std at {first} is {_fmt(grad)}x that at {last}",
    }[key]
    return Finding(
        "exploding",
        key,
        r.ratios[key],
        limit,
        r.step,
        None,
        f"{what} (over {_fmt(limit)}x is exploding) at step {r.step}",
    )


@rule("vanishing")
def _vanishing(r: _Reading) -> Finding | None:
    """The gradient at the first hidden layer is a small share of that at the last."""
    grad, limit, (first, last) = r.ratios["grad_ratio"], r.cfg.vanishing_ratio, r.ends
    if not grad < limit:
        return None
    return Finding(
        "vanishing",
        "grad_ratio",
        grad,
        limit,
        r.step,
        None,
        f"the gradient std at {first} is {_fmt(grad)} of that at {last} "
        f"(under {_fmt(limit)} is vanishing) at step {r.step}",
    )


def _share_rule(verdict: str, key: str, threshold: str, unit: str) -> Rule:
    """A verdict when, in some layer, the share ``key`` of units is over ``cfg.threshold``."""

    def find(r: _Reading) -> Finding | None:
        layer = max(r.hidden, key=lambda k: r.hidden[k].get(key, 0.0))
        value, limit = r.hidden[layer].get(key, 0.0), getattr(r.cfg, threshold)
        if not value > limit:
            return None
        return Finding(
            verdict,
            key,
            value,
            limit,
            r.step,
            layer,
            f"{value:.0%} of {layer}'s {unit} (over {limit:.0%} is {verdict}) at step {r.step}",
        )

    return rule(verdict)(find)


_share_rule("saturated", "saturated", "saturated_fraction", "outputs are within 1% of an asymptote")
_share_rule("dying", "dead", "dead_fraction", "units output zero for the whole batch")
assert set(RULES) == set(PRECEDENCE), "every verdict has one rule and a place in PRECEDENCE"


def findings(snap: Snapshot, cfg: DiagnosticsConfig) -> list[Finding]:
    """Every verdict that one snapshot supports, with its evidence (one finding per verdict:
    the worst layer)."""
    hidden = {k: snap.layers[k] for k in hidden_layers(snap)}
    reading = _Reading(snap, cfg, hidden, ratios(snap))
    return [f for find in RULES.values() if (f := find(reading)) is not None]


def _phase(name: str, found: list[Finding], steps: tuple[int, int]) -> Phase:
    by_verdict = {f.verdict: f for f in found}
    for verdict in PRECEDENCE:
        if verdict in by_verdict:
            explained = EXPLAINS.get(verdict, {})
            consequences = [
                f"{v}: {by_verdict[v].evidence}, because {explained[v]}"
                for v in by_verdict
                if v in explained
            ]
            also = [
                by_verdict[v].evidence for v in by_verdict if v != verdict and v not in explained
            ]
            return Phase(name, steps, verdict, by_verdict[verdict].evidence, consequences, also)
    return Phase(name, steps, "healthy", "")


def _usual(per_snapshot: list[list[Finding]]) -> list[Finding]:
    """Findings that hold in at least half of the snapshots (each snapshot's findings), each
    with its first evidence."""
    out = []
    for verdict in PRECEDENCE:
        hits = [f for found in per_snapshot for f in found if f.verdict == verdict]
        if hits and len(hits) * 2 >= len(per_snapshot):
            first = hits[0]
            out.append(
                Finding(
                    verdict,
                    first.statistic,
                    first.value,
                    first.threshold,
                    first.step,
                    first.layer,
                    f"{first.evidence}; in {len(hits)} of {len(per_snapshot)} snapshots",
                )
            )
    return out


def advice(verdict: str, activation: str, init: str, scale: float = 1.0) -> str:
    """What to change for the cause found in a model with this activation and init, whatever
    the knob behind it (``attribution`` names the knob, whose change comes first)."""
    family = "xavier_normal" if activation in SATURATING else "he_normal"
    if verdict == "symmetric":
        return (
            f"break symmetry with a random init: init.name={family} (init.name={init} starts "
            "every unit of a layer alike)"
        )
    if verdict == "exploding":
        hint = f"init.scale below {scale:g}" if scale > 1 else "a smaller init scale"
        return (
            f"lower the init scale (init.name={family} at init.scale=1, or {hint}); if the "
            "init is right, lower optim.lr or set optim.grad_clip"
        )
    if verdict == "saturated":
        return (
            "keep pre-activations in the linear range: init.name=xavier_normal for "
            f"{activation}, or model.activation=relu with init.name=he_normal"
        )
    if verdict == "dying":
        return (
            "use model.activation=leaky_relu (it keeps a small gradient below zero) or a "
            "lower optim.lr; a negative init.bias makes units die sooner"
        )
    if verdict == "vanishing":
        if activation == "sigmoid":
            return (
                "sigmoid's slope is at most 0.25, so each layer shrinks the gradient: use "
                "model.activation=tanh with init.name=xavier_normal, or relu with he_normal"
            )
        if activation in SATURATING:
            return f"use init.name=xavier_normal for {activation} (init.name={init} shrinks it)"
        return f"use He init for {activation}: init.name=he_normal (init.name={init} shrinks it)"
    return ""


def diagnose(
    snapshots: list[Snapshot],
    cfg: DiagnosticsConfig,
    *,
    setup: Setup = Setup(),
    diverged: tuple[int, str | None] | None = None,
    running: bool = False,
) -> Diagnosis:
    """The run's diagnosis from its snapshots, with the knob of ``setup`` (what the run was
    configured with) behind it; ``diverged`` is the (step, first non-finite layer) of a run
    whose loss became NaN or infinite; ``running``: the run goes on, so its last phase is the
    latest snapshot, not the end."""
    phases: list[Phase] = []
    found_in = [findings(s, cfg) for s in snapshots]  # each snapshot's, read once
    if snapshots:
        first = snapshots[0]
        phases.append(_phase("initialisation", found_in[0], (first.step, first.step)))
        middle = snapshots[1:-1]
        if middle:
            steps = (middle[0].step, middle[-1].step)
            phases.append(_phase("training", _usual(found_in[1:-1]), steps))
        if len(snapshots) > 1 and diverged is None:
            last = snapshots[-1]
            end = "latest" if running else "end"
            phases.append(_phase(end, found_in[-1], (last.step, last.step)))
    if diverged is not None:
        step, layer = diverged
        where = f"; the first non-finite values are in {layer}" if layer else ""
        found = found_in[-1] if len(snapshots) > 1 else []
        found = [f for f in found if f.verdict == "symmetric"] + [
            Finding(
                "exploding",
                "loss",
                math.inf,
                math.inf,
                step,
                layer,
                f"the loss became non-finite at step {step}{where}",
            )
        ]
        phases.append(_phase("end", found, (step, step)))
    unhealthy = [p for p in phases if p.verdict != "healthy"]
    if not phases:
        return Diagnosis("unmeasured", "no diagnostic snapshot was taken", "", "", [], [])
    if not unhealthy:
        return Diagnosis("healthy", _summary(phases), "", "", [], phases)
    cause = unhealthy[0]
    general = advice(cause.verdict, setup.activation, setup.init, setup.scale)
    turn = next((i for i, found in enumerate(found_in) if found), len(snapshots))
    knob = attribute(cause.verdict, snapshots, turn, setup, diverged is not None)
    if knob is None:
        return Diagnosis(
            cause.verdict, _summary(phases), cause.evidence, general, cause.consequences, phases
        )
    return Diagnosis(
        cause.verdict,
        _summary(phases),
        cause.evidence,
        f"change {knob.knob} first: {knob.advice}; else {general}",
        cause.consequences,
        phases,
        knob.knob,
        knob.evidence,
    )


def _summary(phases: list[Phase]) -> str:
    """The verdict by phase: "symmetric throughout", "exploding at initialisation, then
    vanishing during training and at the end", "dying at initialisation, then healthy at the
    end"."""
    at = {
        "initialisation": "at initialisation",
        "training": "during training",
        "end": "at the end",
        "latest": "at the latest snapshot",
    }
    spans: list[tuple[str, list[str]]] = []
    for p in phases:
        if spans and spans[-1][0] == p.verdict:
            spans[-1][1].append(at[p.name])
        else:
            spans.append((p.verdict, [at[p.name]]))
    if len(spans) == 1 and len(phases) > 1:
        return f"{spans[0][0]} throughout"
    return ", then ".join(f"{verdict} {' and '.join(when)}" for verdict, when in spans)
