"""Load-test figures and the SLO verdict on them: pure statistics, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# Every gate message starts with this, so the promotion rules can tell an SLO hold from a failed deploy.
GATE_PREFIX = "staging load test: "


@dataclass(frozen=True)
class Sample:
    """One request of a load test: what it did, how long it took, whether the contract's answer came back."""

    operation: str  # create | read | list | update
    entity: str
    ms: float
    ok: bool
    status: int | None  # None: no HTTP answer (timeout, connection refused)
    error: str | None = None


@dataclass(frozen=True)
class OperationStats:
    operation: str
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class LoadTestResult:
    """What a load test measured against one environment."""

    requests: int
    errors: int
    duration_s: float
    concurrency: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    operations: list[OperationStats]
    error_examples: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    @property
    def availability_percent(self) -> float:
        return 100.0 * (1.0 - self.error_rate)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class SloVerdict:
    """Whether a result meets the intent's SLO; `breaches` names each objective missed and by how much."""

    met: bool
    breaches: list[str]
    checked: list[str]

    @property
    def detail(self) -> str:
        return "; ".join(self.breaches or self.checked)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; NaN when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[Sample], *, duration_s: float, concurrency: int, examples: int = 5) -> LoadTestResult:
    """Latency percentiles, errors and a per-operation breakdown of a load test's samples."""
    ms = [s.ms for s in samples]
    ops = []
    for op in ("create", "read", "list", "update"):
        mine = [s for s in samples if s.operation == op]
        if mine:
            lat = [s.ms for s in mine]
            ops.append(OperationStats(op, len(mine), sum(not s.ok for s in mine), percentile(lat, 50),
                                      percentile(lat, 95), percentile(lat, 99)))
    failed = [s for s in samples if not s.ok]
    shown: list[str] = []
    for s in failed:
        text = f"{s.operation} {s.entity}: {s.error or s.status}"
        if text not in shown:
            shown.append(text)
        if len(shown) >= examples:
            break
    return LoadTestResult(
        requests=len(samples), errors=len(failed), duration_s=duration_s, concurrency=concurrency,
        p50_ms=percentile(ms, 50), p95_ms=percentile(ms, 95), p99_ms=percentile(ms, 99),
        max_ms=max(ms) if ms else math.nan, operations=ops, error_examples=shown)


def evaluate_slo(result: LoadTestResult, *, p95_latency_ms: float | None, availability: float | None) -> SloVerdict:
    """The SLO verdict: p95 must not exceed `p95_latency_ms`, availability (percent) must reach `availability`."""
    if p95_latency_ms is not None and not (math.isfinite(p95_latency_ms) and p95_latency_ms > 0):
        raise ValueError(f"p95_latency_ms must be a positive number of milliseconds, got {p95_latency_ms!r}")
    if availability is not None and not (math.isfinite(availability) and 0 < availability <= 100):
        raise ValueError(f"availability is a percentage in (0, 100], got {availability!r}")
    if result.requests == 0:
        return SloVerdict(False, ["the load test completed no request"], [])
    breaches, checked = [], []
    if p95_latency_ms is not None:
        p95 = result.p95_ms
        if p95 > p95_latency_ms:
            breaches.append(f"p95 latency {p95:.2f} ms exceeds p95_latency_ms {p95_latency_ms:g} ms "
                            f"by {p95 - p95_latency_ms:.2f} ms")
        else:
            checked.append(f"p95 latency {p95:.2f} ms within p95_latency_ms {p95_latency_ms:g} ms")
    if availability is not None:
        got = result.availability_percent
        if got < availability:
            breaches.append(f"availability {got:.3f}% is below availability {availability:g}% "
                            f"by {availability - got:.3f} points ({result.errors} of {result.requests} "
                            "requests failed)")
        else:
            checked.append(f"availability {got:.3f}% meets availability {availability:g}%")
    return SloVerdict(not breaches, breaches, checked)


def gate_message(artifact: str, verdict: SloVerdict) -> str:
    """The reason recorded on a release that production must not take."""
    return f"{GATE_PREFIX}SLO missed by {artifact[:12]}: {verdict.detail}"


def is_gate_hold(reason: str | None) -> bool:
    """Whether a recorded failure reason is the SLO gate's (rather than a failed deploy)."""
    return bool(reason) and reason.startswith(GATE_PREFIX)
