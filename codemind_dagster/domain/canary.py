"""Canary rollout: traffic steps and the analysis that compares the new version with the stable one; no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

DEFAULT_STEPS = (10, 50, 100)


@dataclass(frozen=True)
class CanaryStep:
    """One traffic step: the canary's share in percent, and how long it is watched before the verdict."""

    weight: int
    pause_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.weight, int) or not 0 < self.weight <= 100:
            raise ValueError(f"a canary weight is a whole percentage in 1..100, got {self.weight!r}")
        if not (math.isfinite(self.pause_s) and self.pause_s >= 0):
            raise ValueError(f"a canary pause is a non-negative number of seconds, got {self.pause_s!r}")


def parse_steps(text: str, pause_s: float) -> tuple[CanaryStep, ...]:
    """Steps from `10,50,100` (increasing, ending at 100), each watched for `pause_s`."""
    try:
        weights = [int(w) for w in text.replace(" ", "").split(",") if w]
    except ValueError:
        raise ValueError(f"canary steps are comma-separated whole percentages like 10,50,100, got {text!r}") from None
    if not weights or weights[-1] != 100 or any(b <= a for a, b in pairwise(weights)):
        raise ValueError(f"canary steps must increase and end at 100 (all traffic on the new version), got {text!r}")
    return tuple(CanaryStep(w, pause_s) for w in weights)


@dataclass(frozen=True)
class WindowStats:
    """What one version answered through the environment's proxy during a step."""

    requests: int
    errors: int  # 5xx answers and requests that got no answer
    p95_ms: float | None  # None: no request finished in the window

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class MetricsWindow(Protocol):
    """Per-colour request figures of one environment between `begin()` and `stats()`: the proxy's or Prometheus'."""

    source: str

    def begin(self) -> object: ...

    def stats(self, since: object) -> dict[str, WindowStats]: ...


@dataclass(frozen=True)
class AnalysisPolicy:
    """How much worse than stable (and than the SLO) a canary may be before it is rolled back."""

    max_error_rate_increase: float = 0.01  # absolute: 0.01 is one percentage point above stable's rate
    max_p95_ratio: float = 1.5  # canary p95 may be this many times stable's ...
    p95_allowance_ms: float = 5.0  # ... plus this, since local p95s of a few ms jitter by more than 50 %
    min_requests: int = 20  # fewer canary requests than this in a step cannot show anything

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate_increase < 1:
            raise ValueError(f"max_error_rate_increase is a rate in [0, 1), got {self.max_error_rate_increase!r}")
        if not self.max_p95_ratio >= 1:
            raise ValueError(f"max_p95_ratio must be at least 1, got {self.max_p95_ratio!r}")
        if not self.min_requests >= 1:
            raise ValueError(f"min_requests must be at least 1, got {self.min_requests!r}")


@dataclass(frozen=True)
class StepAnalysis:
    """The verdict of one step, with the figures it was taken on."""

    weight: int
    passed: bool
    canary: WindowStats
    stable: WindowStats | None  # None at 100 %, when stable serves nothing
    served_percent: float | None  # the canary's share of requests actually answered in the step
    reasons: list[str] = field(default_factory=list)  # each failed comparison, with its numbers
    source: str = "proxy"

    @property
    def detail(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "canary within stable's figures and the slo"

    def row(self) -> dict:
        """A flat record for metadata tables and the deployment's history."""
        s = self.stable
        return {
            "weight": self.weight, "served_percent": _round(self.served_percent, 1), "passed": self.passed,
            "canary_requests": self.canary.requests, "canary_error_rate": round(self.canary.error_rate, 4),
            "canary_p95_ms": _round(self.canary.p95_ms, 2), "stable_requests": s.requests if s else 0,
            "stable_error_rate": round(s.error_rate, 4) if s else None,
            "stable_p95_ms": _round(s.p95_ms, 2) if s else None, "source": self.source, "detail": self.detail,
        }


def analyze(weight: int, canary: WindowStats, stable: WindowStats | None, policy: AnalysisPolicy, *,
            p95_latency_ms: float | None = None, availability: float | None = None,
            source: str = "proxy") -> StepAnalysis:
    """Compare the canary's window with stable's and with the intent's slo."""
    reasons: list[str] = []
    if canary.requests < policy.min_requests:
        reasons.append(f"only {canary.requests} requests reached the canary at {weight}% "
                       f"(at least {policy.min_requests} are needed to judge it)")
    else:
        rate = canary.error_rate
        if stable is not None and stable.requests >= policy.min_requests:
            allowed = stable.error_rate + policy.max_error_rate_increase
            if rate > allowed:
                reasons.append(f"error rate {rate:.2%} ({canary.errors} of {canary.requests}) exceeds stable's "
                               f"{stable.error_rate:.2%} by {rate - stable.error_rate:.2%} "
                               f"(allowed {policy.max_error_rate_increase:.2%})")
            if canary.p95_ms is not None and stable.p95_ms is not None:
                limit = stable.p95_ms * policy.max_p95_ratio + policy.p95_allowance_ms
                if canary.p95_ms > limit:
                    reasons.append(f"p95 {canary.p95_ms:.2f} ms exceeds stable's {stable.p95_ms:.2f} ms "
                                   f"x{policy.max_p95_ratio:g} + {policy.p95_allowance_ms:g} ms = {limit:.2f} ms")
        if availability is not None and 100 * (1 - rate) < availability:
            reasons.append(f"availability {100 * (1 - rate):.3f}% is below the slo's {availability:g}%")
        if p95_latency_ms is not None and canary.p95_ms is not None and canary.p95_ms > p95_latency_ms:
            reasons.append(f"p95 {canary.p95_ms:.2f} ms exceeds the slo's p95_latency_ms {p95_latency_ms:g} ms")
    total = canary.requests + (stable.requests if stable else 0)
    served = 100.0 * canary.requests / total if total else None
    return StepAnalysis(weight, not reasons, canary, stable, served, reasons, source)


def rollback_reason(artifact: str, step: StepAnalysis) -> str:
    """Why the analysis sent a release back, with the step and its figures."""
    return f"canary analysis of {artifact[:12]} at {step.weight}%: {step.detail}"


# ---- figures from the Prometheus text format ----------------------------------------------------


@dataclass
class ColourCounters:
    """Cumulative request counters of one colour, as one scrape showed them."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count, summed over routes

    def minus(self, before: ColourCounters | None) -> WindowStats:
        b = before or ColourCounters()
        deltas = {le: n - b.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return WindowStats(round(self.requests - b.requests), round(self.errors - b.errors),
                           quantile_ms(0.95, deltas))


def is_error(status: str) -> bool:
    """5xx, or no answer at all (the proxy's `none`)."""
    return status == "none" or (len(status) == 3 and status.startswith("5"))


def parse_counters(text: str, metric: str = "http") -> dict[str, ColourCounters]:
    """Per-colour counters from a proxy's exposition (`http_requests_total`, `http_request_duration_seconds`)."""
    out: dict[str, ColourCounters] = {}
    requests, bucket = f"{metric}_requests_total{{", f"{metric}_request_duration_seconds_bucket{{"
    for line in text.splitlines():
        if line.startswith(requests):
            kind = "requests"
        elif line.startswith(bucket):
            kind = "bucket"
        else:
            continue
        labels_part, _, value = line.rpartition("} ")
        labels = _labels(labels_part[labels_part.index("{") + 1:])
        c = out.setdefault(labels.get("color", ""), ColourCounters())
        n = float(value)
        if kind == "requests":
            c.requests += n
            if is_error(labels.get("status", "")):
                c.errors += n
        else:
            le = float(labels["le"])  # float("+Inf") is inf
            c.buckets[le] = c.buckets.get(le, 0.0) + n
    return out


def quantile_ms(q: float, buckets: Mapping[float, float]) -> float | None:
    """histogram_quantile as Prometheus computes it (linear within a bucket), in milliseconds."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in items:
        if n >= rank:
            if math.isinf(le):
                return prev_le * 1000  # above the highest bound: Prometheus answers that bound
            width = n - prev_n
            frac = (rank - prev_n) / width if width > 0 else 1.0
            return (prev_le + (le - prev_le) * frac) * 1000
        prev_le, prev_n = le, n
    return prev_le * 1000


def _labels(text: str) -> dict[str, str]:
    out, i, n = {}, 0, len(text)
    while i < n:
        eq = text.index("=", i)
        name = text[i:eq].strip(" ,")
        j, value = eq + 2, []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        out[name] = "".join(value)
        i = j + 1
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
