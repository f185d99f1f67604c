"""Canary step figures from Prometheus: the proxy's counters as Prometheus scraped them, read through PromQL.

Accuracy. A step's figures are exact differences of the proxy's own counters between two scrapes: the last one
at or before `begin()` and the first one after `stats()` was called. They come from the raw samples of a range
selector (reset-aware, like `increase()`), not from `increase()` itself, which is wrong on a canary step in two
ways: it extrapolates to the edges of a range only a few scrapes long, and it cannot count the first scrape of a
series born inside the range, which with the proxy (a series appears at its first request) is where a new
version's requests, and its first errors, are. What remains: requests answered between the baseline scrape and
`begin()` (at most one scrape interval, 1 s with `make monitoring-up`) count in the step, as do those answered
between the `stats()` call and the scrape after it; with no traffic at those edges the figures equal the proxy's
to the request (tests/test_prometheus.py checks it against a real Prometheus).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

from codemind_dagster.domain.canary import WindowStats, is_error, quantile_ms
from codemind_dagster.resources.scrape_targets import PROXY_JOB

REQUESTS = "http_requests_total"
BUCKETS = "http_request_duration_seconds_bucket"
# How far before `begin()` the baseline sample is looked for: Prometheus's own lookback for instant vectors.
LOOKBACK_S = 300
SETUP_HINT = ("run `make monitoring-up` (it scrapes what $CODEMIND_HOME/monitoring/targets.json lists) "
              "and check the target at {url}/targets")


class PrometheusError(RuntimeError):
    """Prometheus could not give the figures: unreachable, a query it refused, or a target it does not scrape."""


# ---- PromQL, pure -----------------------------------------------------------------------------


def selector(labels: Mapping[str, str]) -> str:
    """`{a="x",b="y"}` with PromQL string escaping, labels in the given order."""
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return "{" + ",".join(f"{k}={quote(str(v))}" for k, v in labels.items()) + "}"


def proxy_labels(service: str, environment: str) -> dict[str, str]:
    """The labels of one environment's proxy target, as scrape_targets writes them."""
    return {"job": PROXY_JOB, "service": service, "environment": environment}


def samples_query(metric: str, labels: Mapping[str, str], range_s: int) -> str:
    """The raw samples of `metric` over the last `range_s` seconds (a range selector: no extrapolation)."""
    return f"{metric}{selector(labels)}[{int(range_s)}s]"


def requests_increase_query(labels: Mapping[str, str], window: str) -> str:
    """Requests per colour and status over `window` (extrapolated by increase(); for dashboards and alerts)."""
    return f"sum by (color, status) (increase({REQUESTS}{selector(labels)}[{window}]))"


def p95_query(labels: Mapping[str, str], window: str) -> str:
    """p95 latency per colour in seconds over `window`, as histogram_quantile interpolates it."""
    return f"histogram_quantile(0.95, sum by (color, le) (rate({BUCKETS}{selector(labels)}[{window}])))"


def instance_of(metrics_url: str) -> str:
    """The `instance` label Prometheus gives the target of a proxy's metrics URL: its host:port."""
    from urllib.parse import urlsplit

    parts = urlsplit(metrics_url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"a proxy metrics URL names a host and a port, got {metrics_url!r}")
    return f"{parts.hostname}:{parts.port}"


def range_for(since: float, end: float) -> int:
    """Seconds a range selector evaluated at `end` must span to hold the baseline sample before `since`."""
    return max(1, math.ceil(end - since)) + LOOKBACK_S


# ---- results, pure ----------------------------------------------------------------------------


def series_increase(values: Sequence[tuple[float, float]], since: float) -> float:
    """How much a counter grew after its last sample at or before `since`, through counter resets."""
    before = [v for t, v in values if t <= since]
    after = [v for t, v in values if t > since]
    prev = before[-1] if before else 0.0  # created after `since`: it started from zero
    total = 0.0
    for v in after:
        total += v - prev if v >= prev else v  # a drop is a restart, which counted v from zero
        prev = v
    return total


def window_stats(requests: Iterable[Mapping], buckets: Iterable[Mapping], since: float) -> dict[str, WindowStats]:
    """Per-colour figures from the matrix results of samples_query for the requests and the duration buckets."""
    counts: dict[str, list[float]] = {}
    for series in requests:
        labels, n = series["metric"], series_increase(_values(series), since)
        c = counts.setdefault(labels.get("color", ""), [0.0, 0.0])
        c[0] += n
        if is_error(labels.get("status", "")):
            c[1] += n
    per_le: dict[str, dict[float, float]] = {}
    for series in buckets:
        labels = series["metric"]
        le = float(labels["le"])  # "+Inf" reads as inf
        b = per_le.setdefault(labels.get("color", ""), {})
        b[le] = b.get(le, 0.0) + series_increase(_values(series), since)
    out = {}
    for colour in sorted(set(counts) | set(per_le)):
        n, errors = counts.get(colour, (0.0, 0.0))
        out[colour] = WindowStats(round(n), round(errors), quantile_ms(0.95, per_le.get(colour, {})))
    return out


def _values(series: Mapping) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series.get("values", ())]


# ---- the HTTP API -----------------------------------------------------------------------------


def query(url: str, promql: str, at: float | None = None, timeout_s: float = 5.0) -> dict:
    """The `data` of an instant query (POST /api/v1/query); PrometheusError naming the query when refused."""
    import httpx

    form = {"query": promql}
    if at is not None:
        form["time"] = f"{at:.3f}"
    base = url.rstrip("/")
    try:
        # trust_env=False: a proxy from the environment must not sit between us and a loopback Prometheus.
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            r = client.post(f"{base}/api/v1/query", data=form)
    except httpx.HTTPError as e:
        raise PrometheusError(f"Prometheus at {base} is unreachable ({type(e).__name__}: {e}); start it with "
                              "`make monitoring-up` or fix CODEMIND_PROMETHEUS_URL") from e
    try:
        body = r.json()
    except ValueError:
        raise PrometheusError(f"{base}/api/v1/query answered HTTP {r.status_code} with no JSON "
                              f"({r.text[:200]!r}): is CODEMIND_PROMETHEUS_URL a Prometheus?") from None
    if r.status_code != 200 or body.get("status") != "success":
        raise PrometheusError(f"Prometheus at {base} refused the query {promql!r}: "
                              f"{body.get('errorType', r.status_code)}: {body.get('error', r.text[:200])}")
    return body["data"]


def target_errors(url: str, labels: Mapping[str, str], timeout_s: float = 5.0) -> list[str]:
    """The last scrape error of each active target carrying `labels` (GET /api/v1/targets)."""
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/api/v1/targets", params={"state": "active"}, timeout=timeout_s,
                      trust_env=False)
        targets = r.json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []
    return [f"{t.get('scrapeUrl')}: {t.get('lastError') or t.get('health')}" for t in targets
            if all(t.get("labels", {}).get(k) == v for k, v in labels.items())]


class PrometheusWindow:
    """One environment's per-colour step figures from the proxy's counters in Prometheus (see the module doc)."""

    source = "prometheus"

    def __init__(self, url: str, service: str, environment: str, *, metrics_url: str | None = None,
                 timeout_s: float = 5.0, scrape_wait_s: float = 20.0, poll_s: float = 0.2) -> None:
        self.url = url.rstrip("/")
        self.labels = proxy_labels(service, environment)
        if metrics_url is not None:
            # Pinned to the running proxy: a restarted one (new metrics port) must be scraped before a step counts.
            self.labels["instance"] = instance_of(metrics_url)
        self.timeout_s = timeout_s
        # Covers a new targets file (Prometheus batches discovery updates for about 5 s) and, for a Prometheus
        # other than `make monitoring-up`'s, the default 15 s scrape interval.
        self.scrape_wait_s = scrape_wait_s
        self.poll_s = poll_s

    @property
    def target(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items())

    def _last_scrape(self) -> tuple[float, bool] | None:
        """(timestamp, up) of the target's latest scrape, None when Prometheus has none in the last minute."""
        data = query(self.url, f"up{selector(self.labels)}[60s]", timeout_s=self.timeout_s)
        last = [_values(s)[-1] for s in data["result"] if s.get("values")]
        if not last:
            return None
        t, v = max(last)
        return t, v == 1.0

    def _wait_scrape(self, after: float | None) -> float:
        """The timestamp of a successful scrape (later than `after` if given), waiting up to scrape_wait_s."""
        deadline = time.monotonic() + self.scrape_wait_s
        while True:
            last = self._last_scrape()
            fresh = last is not None and (after is None or last[0] > after)
            # A failed scrape is reported at once: the proxy's figures are not there, whatever comes next.
            if fresh and last[1]:
                return last[0]
            if fresh or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        if last is None:
            raise PrometheusError(f"Prometheus at {self.url} has not scraped the proxy target {self.target} "
                                  f"within {self.scrape_wait_s:g}s: " + SETUP_HINT.format(url=self.url))
        if not last[1]:
            errors = "; ".join(target_errors(self.url, self.labels, self.timeout_s)) or "no error recorded"
            raise PrometheusError(f"Prometheus at {self.url} fails to scrape the proxy target {self.target} "
                                  f"({errors}): " + SETUP_HINT.format(url=self.url))
        raise PrometheusError(f"Prometheus at {self.url} has not scraped the proxy target {self.target} again "
                              f"within {self.scrape_wait_s:g}s (last scrape at {last[0]:.3f}, asked after "
                              f"{after:.3f}): " + SETUP_HINT.format(url=self.url))

    def begin(self) -> object:
        """Now, once the proxy has a scrape behind it: without one the counters before the step would count."""
        self._wait_scrape(None)
        return time.time()

    def stats(self, since: object) -> dict[str, WindowStats]:
        """Per-colour figures since `begin()`, once Prometheus has scraped the proxy after this call."""
        since = float(since)  # type: ignore[arg-type]
        end = self._wait_scrape(time.time())
        span = range_for(since, end)
        results = [query(self.url, samples_query(metric, self.labels, span), at=end, timeout_s=self.timeout_s)
                   for metric in (REQUESTS, BUCKETS)]
        return window_stats(results[0]["result"], results[1]["result"], since)
