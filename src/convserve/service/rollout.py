"""Challengers on live traffic, per served model: shadow and canary, and promotion on what
they showed.

A model's challenger is the version its registry alias ``challenger`` points to (the alias
``convserve export`` and training jobs give a version that did not beat the champion
offline). With a shadow share (``CONVSERVE_SHADOW_SHARE``, or per model through
``PUT /v1/models/{name}/rollout``), that share of the model's requests is sent to the
challenger too, once the champion has answered, off the response path: whether the two agree
on the top class, each one's confidence (its top probability) and each one's inference time
are counted. With a canary share, that share of the requests is answered by the challenger
instead, and the answer names the version (and alias) that answered.

Each worker process logs what it counted to the challenger version's MLflow run every
``CONVSERVE_ROLLOUT_LOG_SECONDS``, as the ``live.*`` metrics of that window (its requests,
and the agreement, confidences and times over them). ``promote`` (``convserve promote``,
``POST /admin/models/{name}/promote``) reads every window back, weighs each by its requests,
and moves ``champion`` to the challenger when the live evidence holds: at least
``min_requests`` shadowed images, agreement with the champion at least ``min_agreement``, and
inference time at most ``max_latency_ratio`` times the champion's. The decision and its
evidence go to the version's tags and description either way.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields

from convserve.contract import CHALLENGER, CHAMPION
from convserve.service.registry import Registry, not_found

LIVE = "live."  # the metrics' prefix on the challenger's run


@dataclass
class Shares:
    shadow: float = 0.0
    canary: float = 0.0

    @property
    def active(self) -> bool:
        return self.shadow > 0 or self.canary > 0


@dataclass
class Window:
    """Sums over the shadowed images of a span of time, and the canary's answers."""

    requests: int = 0
    agree: int = 0
    challenger_confidence: float = 0.0
    champion_confidence: float = 0.0
    challenger_seconds: float = 0.0
    champion_seconds: float = 0.0
    canary: int = 0
    failures: int = 0
    skipped: int = 0  # not shadowed: the challenger's shadow process was that far behind

    @property
    def counted(self) -> bool:
        """Whether any request of its span was counted: shadowed, skipped, failed or
        canaried."""
        return any(self.counts().values())

    def merge(self, other: Window) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def counts(self) -> dict[str, int]:
        """What came of its requests: shadowed (``requests``), canary, skipped, failed."""
        return {
            "requests": self.requests,
            "canary": self.canary,
            "skipped": self.skipped,
            "failures": self.failures,
        }

    def means(self) -> dict[str, float]:
        """Over its shadowed images (nothing before the first): the agreement, each one's
        confidence and inference time per image."""
        n = self.requests
        if not n:
            return {}
        return {
            "agreement": self.agree / n,
            "challenger_confidence": self.challenger_confidence / n,
            "champion_confidence": self.champion_confidence / n,
            "challenger_ms": 1e3 * self.challenger_seconds / n,
            "champion_ms": 1e3 * self.champion_seconds / n,
        }

    def metrics(self) -> dict[str, float]:
        """As the ``live.*`` metrics of one window."""
        return {LIVE + k: float(v) for k, v in (self.counts() | self.means()).items()}


@dataclass
class Live:
    """One model's challenger traffic in this process: since start (shown by
    ``/v1/models``) and since the last log (``pending``). Written and read on the event
    loop only (a shadow run's answer comes back there, shadow.py)."""

    run_id: str = ""  # the challenger version's run, where its windows are logged
    total: Window = field(default_factory=Window)
    pending: Window = field(default_factory=Window)

    def add(self, window: Window) -> None:
        """What a shadow run showed (shadow.py)."""
        self.total.merge(window)
        self.pending.merge(window)

    def count(self, canary: int = 0, failures: int = 0, skipped: int = 0) -> None:
        """Requests routed to the challenger, or not run on it (once a request, so the
        fields are added without a window of their own)."""
        for window in (self.total, self.pending):
            window.canary += canary
            window.failures += failures
            window.skipped += skipped

    def take(self) -> Window:
        pending, self.pending = self.pending, Window()
        return pending

    def give_back(self, window: Window) -> None:
        """A window that could not be logged, for the next log."""
        self.pending.merge(window)

    def snapshot(self) -> dict[str, int | float]:
        """Since start: the counts, then the means over the shadowed images (once any)."""
        counts = self.total.counts()
        shown: dict[str, int | float] = {"shadowed": counts.pop("requests"), **counts}
        return shown | {k: round(v, 4) for k, v in self.total.means().items()}


@dataclass(frozen=True)
class Criteria:
    min_requests: int = 100
    min_agreement: float = 0.9
    max_latency_ratio: float = 1.5


@dataclass
class Evidence:
    requests: int
    canary: int
    agreement: float | None
    challenger_confidence: float | None
    champion_confidence: float | None
    challenger_ms: float | None
    champion_ms: float | None
    skipped: int = 0  # not shadowed: the challenger's process was that far behind
    failures: int = 0  # shadowed, and the challenger failed


def evidence(registry: Registry, run_id: str) -> Evidence:
    """Every window the serving processes logged to the challenger's run, weighed by its
    requests."""
    history = {
        key: registry.metric_history(run_id, LIVE + key)
        for key in (
            "requests",
            "canary",
            "agreement",
            "challenger_confidence",
            "champion_confidence",
            "challenger_ms",
            "champion_ms",
            "skipped",
            "failures",
        )
    }
    by_step = {step: value for value, step in history["requests"]}
    total = int(sum(by_step.values()))

    def mean(key: str) -> float | None:
        pairs = [(value, by_step.get(step, 0.0)) for value, step in history[key]]
        weight = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / weight if weight else None

    return Evidence(
        requests=total,
        canary=int(sum(v for v, _ in history["canary"])),
        agreement=mean("agreement"),
        challenger_confidence=mean("challenger_confidence"),
        champion_confidence=mean("champion_confidence"),
        challenger_ms=mean("challenger_ms"),
        champion_ms=mean("champion_ms"),
        skipped=int(sum(v for v, _ in history["skipped"])),
        failures=int(sum(v for v, _ in history["failures"])),
    )


def judge(e: Evidence, c: Criteria) -> tuple[bool, str]:
    """Whether the live evidence holds, and why, in words."""
    if e.requests < c.min_requests or e.agreement is None:
        return False, f"{e.requests} shadowed images, fewer than the {c.min_requests} asked"
    assert e.challenger_ms is not None and e.champion_ms is not None
    seen = (
        f"agreement {e.agreement:.3f} with the champion over {e.requests} shadowed images, "
        f"confidence {e.challenger_confidence:.3f} against {e.champion_confidence:.3f}, "
        f"inference {e.challenger_ms:.2f} ms against {e.champion_ms:.2f} ms"
    )
    if e.agreement < c.min_agreement:
        return False, f"{seen}: agreement below {c.min_agreement:g}"
    if e.challenger_ms > c.max_latency_ratio * e.champion_ms:
        return False, f"{seen}: slower than {c.max_latency_ratio:g}x the champion"
    return True, seen


@dataclass
class LiveDecision:
    promoted: bool
    model: str
    version: str
    previous_champion: str | None
    reason: str
    evidence: Evidence


def promote(registry: Registry, name: str, criteria: Criteria = Criteria()) -> LiveDecision:
    """Judge ``name``'s challenger on its live evidence; move ``champion`` to it when the
    evidence holds (and drop its ``challenger`` alias); record the decision on the version.
    ``LookupError`` when the model has no challenger; the registry's own error when it
    cannot be read."""
    try:
        challenger = registry.get_model_version_by_alias(name, CHALLENGER)
    except Exception as err:
        if not not_found(err):
            raise
        raise LookupError(f"{name!r} has no {CHALLENGER} version: {err}") from err
    try:
        champion: str | None = registry.get_model_version_by_alias(name, CHAMPION).version
    except Exception as err:
        if not not_found(err):
            raise
        champion = None  # none yet
    seen = evidence(registry, challenger.run_id)
    promoted, reason = judge(seen, criteria)
    version = challenger.version
    tags = {
        "convserve.live_evidence": json.dumps(asdict(seen)),
        "convserve.live_decision": ("promoted: " if promoted else "not promoted: ") + reason,
        "convserve.live_decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if promoted:
        tags |= {
            "convserve.promotion": CHAMPION,
            "convserve.promotion_reason": f"live: {reason}",
            "convserve.previous_champion": champion or "",
        }
        description = f"Champion on live traffic: {reason}."
    else:
        description = f"Challenger, not promoted on live traffic: {reason}."
    # the decision recorded first: a server that follows the alias reads it with the version
    registry.tag_version(name, version, tags)
    registry.describe_version(name, version, description)
    if promoted:
        registry.set_alias(name, CHAMPION, version)
        registry.delete_alias(name, CHALLENGER)
    return LiveDecision(promoted, name, version, champion, reason, seen)
