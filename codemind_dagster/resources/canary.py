"""The local canary: read-only traffic through the environment's URL and each step's figures from the proxy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from codemind_dagster.domain.canary import (
    AnalysisPolicy,
    CanaryStep,
    MetricsWindow,
    StepAnalysis,
    WindowStats,
    analyze,
    parse_counters,
)

# A step whose canary has not yet answered `min_requests` is watched this many pauses longer before it is judged.
_EXTEND_PAUSES = 3
_MIN_EXTENSION_S = 10.0


class ProxyWindow:
    """Step figures from the proxy's own GET /metrics: the counters per colour, before and after."""

    source = "proxy"

    def __init__(self, metrics_url: str, timeout_s: float = 5.0) -> None:
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s

    def _scrape(self):
        import httpx

        try:
            r = httpx.get(self.metrics_url, timeout=self.timeout_s, trust_env=False)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise RuntimeError(f"cannot read the proxy's metrics at {self.metrics_url}: {e}") from e
        return parse_counters(r.text)

    def begin(self) -> object:
        return self._scrape()

    def stats(self, since: object) -> dict[str, WindowStats]:
        after = self._scrape()
        return {colour: c.minus(since.get(colour)) for colour, c in after.items()}  # type: ignore[union-attr]


class Traffic:
    """Read-only requests to the environment's URL, one connection each, so the proxy's split applies to each."""

    def __init__(self, url: str, paths: Sequence[str], concurrency: int = 4, timeout_s: float = 5.0) -> None:
        if not paths:
            raise ValueError("canary traffic needs at least one path to request")
        self.url = url.rstrip("/")
        self.paths = list(paths)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.sent = 0

    def run_until(self, done: Callable[[], bool]) -> None:
        """Send requests until `done()` holds; what they answer is read from the metrics, not here."""
        import httpx

        stop = threading.Event()
        counts = [0] * self.concurrency

        def worker(i: int) -> None:
            # No keep-alive: the proxy splits connections, and a pooled one would pin a worker to one version.
            limits = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=self.url, timeout=self.timeout_s, trust_env=False, limits=limits) as c:
                n = i
                while not stop.is_set():
                    try:
                        c.get(self.paths[n % len(self.paths)], params={"limit": 1})
                    except httpx.HTTPError:
                        pass  # the proxy counts it (no answer); nothing to add here
                    n += 1
                    counts[i] += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.concurrency)]
        for t in threads:
            t.start()
        try:
            while not done():
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(self.timeout_s + 1)
            self.sent += sum(counts)


@dataclass
class CanaryRollout:
    """What the runtime needs to walk a canary: the steps, and a verdict for each from traffic and metrics."""

    steps: tuple[CanaryStep, ...]
    policy: AnalysisPolicy
    paths: tuple[str, ...]  # read-only routes the synthetic traffic requests
    p95_latency_ms: float | None = None
    availability: float | None = None
    window: Callable[[str], MetricsWindow] = ProxyWindow  # proxy metrics URL -> figures source
    concurrency: int = 4
    baseline: WindowStats | None = None  # stable's figures from the last step that sent it traffic

    def analyze(self, step: CanaryStep, *, url: str, metrics_url: str, stable: str, canary: str) -> StepAnalysis:
        """Send traffic for the step's pause (longer if the canary saw too few requests), then judge it."""
        window = self.window(metrics_url)
        since = window.begin()
        traffic = Traffic(url, self.paths, self.concurrency)
        started = time.monotonic()
        ends = started + step.pause_s
        latest = started + max(step.pause_s * _EXTEND_PAUSES, _MIN_EXTENSION_S)
        # Cheap enough to count from the proxy every half second; Prometheus is only asked once, at the end.
        probe = window if isinstance(window, ProxyWindow) else ProxyWindow(metrics_url)
        probe_since = since if probe is window else probe.begin()
        last_probe = [started]

        def done() -> bool:
            now = time.monotonic()
            if now < ends:
                return False
            if now >= latest:
                return True
            if now - last_probe[0] < 0.5:
                return False
            last_probe[0] = now
            seen = probe.stats(probe_since).get(canary)
            return seen is not None and seen.requests >= self.policy.min_requests

        traffic.run_until(done)
        figures = window.stats(since)
        empty = WindowStats(0, 0, None)
        now_canary = figures.get(canary, empty)
        now_stable = figures.get(stable, empty)
        if now_stable.requests >= self.policy.min_requests:
            self.baseline = now_stable
        compare = now_stable if step.weight < 100 else self.baseline
        result = analyze(step.weight, now_canary, compare, self.policy, p95_latency_ms=self.p95_latency_ms,
                         availability=self.availability, source=window.source)
        if step.weight == 100:
            # The comparison used an earlier baseline; the served share is what this step really answered.
            total = now_canary.requests + now_stable.requests
            served = 100.0 * now_canary.requests / total if total else None
            result = StepAnalysis(result.weight, result.passed, result.canary, compare, served, result.reasons,
                                  result.source)
        return result
