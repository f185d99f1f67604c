"""The platform layer of every generated service: `GET /metrics`, and fault injection only when asked for."""

# Copied next to each release as `codemind_service.py` and started as `uvicorn codemind_service:app`, which
# wraps the bundle's own `service.app:app`: every service gets the same metrics whoever wrote its code (the
# offline generator or a model). Stdlib only, so it adds nothing to a service's dependencies; the proxy
# imports its metric classes too. It must not import from the codemind_dagster package.

from __future__ import annotations

import bisect
import importlib
import json
import math
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Finer than Prometheus' defaults below 300 ms, where the intents' p95 SLOs sit.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
           10.0)
MAX_ROUTES = 200  # distinct route labels kept; the rest count as "other", so scrapes stay bounded
UNMATCHED = "unmatched"  # requests no route of the app matched (404s for unknown paths)

ERROR_RATE_VAR = "CODEMIND_FAULT_ERROR_RATE"
LATENCY_VAR = "CODEMIND_FAULT_LATENCY_MS"
STATUS_VAR = "CODEMIND_FAULT_STATUS"
FAULT_VARS = (ERROR_RATE_VAR, LATENCY_VAR, STATUS_VAR)
# Faults spare health and metrics: a faulty version must deploy and stay observable, so the rollback it
# is meant to provoke comes from the traffic analysis, not from a failed health check.
FAULT_EXEMPT = frozenset({HEALTH_PATH, METRICS_PATH})
_PPM = 1_000_000


# ------------------------------------------------------------------------------------------ exposition


def escape(value: str) -> str:
    """A label value as the text format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class RequestMetrics:
    """Request count by labels and status, a latency histogram and in-flight requests, thread-safe."""

    def __init__(self, label_names: tuple[str, ...], prefix: str = "http", buckets: tuple[float, ...] = BUCKETS):
        self.label_names = label_names  # the labels of one request, before the status
        self.prefix = prefix
        self.buckets = buckets
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], int] = {}  # labels + (status,) -> requests
        self._hist: dict[tuple[str, ...], list[float]] = {}  # labels -> bucket counts, then sum, then count
        self._in_flight: dict[tuple[str, ...], int] = {}  # labels without the route -> requests

    def started(self, group: tuple[str, ...]) -> None:
        with self._lock:
            self._in_flight[group] = self._in_flight.get(group, 0) + 1

    def finished(self, group: tuple[str, ...]) -> None:
        with self._lock:
            self._in_flight[group] = self._in_flight.get(group, 0) - 1

    def observe(self, values: tuple[str, ...], status: str, seconds: float | None,
                group: tuple[str, ...] | None = None) -> None:
        """One answered request (and, with `group`, no longer in flight); `seconds` None: it got no answer."""
        key = (*values, status)
        with self._lock:
            if group is not None:
                self._in_flight[group] = self._in_flight.get(group, 0) - 1
            self._counts[key] = self._counts.get(key, 0) + 1
            if seconds is None:
                return
            row = self._hist.get(values)
            if row is None:
                row = self._hist[values] = [0.0] * (len(self.buckets) + 2)
            # bisect_left: a value equal to a bound falls in that bucket (le is inclusive); above all: +Inf only.
            i = bisect.bisect_left(self.buckets, seconds)
            if i < len(self.buckets):
                row[i] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self, in_flight_names: tuple[str, ...]) -> list[str]:
        """Exposition lines; the in-flight gauge is labelled by `in_flight_names`."""
        with self._lock:
            counts = sorted(self._counts.items())
            hist = sorted((k, list(v)) for k, v in self._hist.items())
            in_flight = sorted(self._in_flight.items())
        p, names = self.prefix, self.label_names
        out = [f"# HELP {p}_requests_total Requests answered, by {', '.join(names)} and status.",
               f"# TYPE {p}_requests_total counter"]
        out += [f"{p}_requests_total{labels((*names, 'status'), key)} {n}" for key, n in counts]
        out += [f"# HELP {p}_request_duration_seconds Time from the request to the end of its answer.",
                f"# TYPE {p}_request_duration_seconds histogram"]
        for key, row in hist:
            cumulative = 0.0
            for bound, n in zip(self.buckets, row, strict=False):
                cumulative += n
                le = labels(names, key, f'le="{bound}"')
                out.append(f"{p}_request_duration_seconds_bucket{le} {number(cumulative)}")
            le = labels(names, key, 'le="+Inf"')
            out.append(f"{p}_request_duration_seconds_bucket{le} {number(row[-1])}")
            out.append(f"{p}_request_duration_seconds_sum{labels(names, key)} {row[-2]!r}")
            out.append(f"{p}_request_duration_seconds_count{labels(names, key)} {number(row[-1])}")
        out += [f"# HELP {p}_requests_in_flight Requests received and not yet answered.",
                f"# TYPE {p}_requests_in_flight gauge"]
        out += [f"{p}_requests_in_flight{labels(in_flight_names, key)} {n}" for key, n in in_flight]
        return out


def process_metrics() -> list[str]:
    """The standard process_* metrics (as prometheus_client names them), from /proc where there is one."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        out.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {number(value)}"))

    try:
        with open("/proc/self/stat", "rb") as f:
            # Fields after the command, which may itself hold spaces and parentheses.
            fields = f.read().rpartition(b")")[2].split()
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        metric("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.", cpu)
        metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", int(fields[20]))
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", int(fields[21]) * page)
        metric("process_start_time_seconds", "gauge", "Start time of the process since the epoch in seconds.",
               boot + int(fields[19]) / ticks)
        metric("process_open_fds", "gauge", "Number of open file descriptors.", len(os.listdir("/proc/self/fd")))
    except (OSError, ValueError, IndexError, StopIteration):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        metric("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.",
               usage.ru_utime + usage.ru_stime)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
        metric("process_max_resident_memory_bytes", "gauge", "Peak resident memory in bytes.",
               usage.ru_maxrss * scale)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft)
    v = sys.version_info
    out += ["# HELP python_info Python platform information.", "# TYPE python_info gauge",
            (f'python_info{{implementation="{sys.implementation.name}",major="{v.major}",minor="{v.minor}",'
             f'patchlevel="{v.micro}",version="{v.major}.{v.minor}.{v.micro}"}} 1')]
    return out


def exposition(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# ------------------------------------------------------------------------------------------ faults


class FaultConfigError(ValueError):
    """A CODEMIND_FAULT_* variable holds something that is not a valid setting."""


@dataclass(frozen=True)
class Faults:
    """What to break: a share of requests answered with `status`, and a delay before every request."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    status: int = 500

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise FaultConfigError(f"{ERROR_RATE_VAR} must be a share from 0 to 1, got {self.error_rate!r}")
        if not 0.0 <= self.latency_ms <= 60_000:
            raise FaultConfigError(f"{LATENCY_VAR} must be milliseconds from 0 to 60000, got {self.latency_ms!r}")
        if not 500 <= self.status <= 599:
            raise FaultConfigError(f"{STATUS_VAR} must be a 5xx status, got {self.status!r}")

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults | None:
        """The faults the environment asks for, None when no CODEMIND_FAULT_* variable is set."""
        env = os.environ if environ is None else environ
        if not any(env.get(name, "").strip() for name in FAULT_VARS):
            return None
        faults = cls(error_rate=_env_number(env, ERROR_RATE_VAR, 0.0),
                     latency_ms=_env_number(env, LATENCY_VAR, 0.0),
                     status=int(_env_number(env, STATUS_VAR, 500, integer=True)))
        return faults if faults.active else None


def _env_number(env: Mapping[str, str], name: str, default: float, *, integer: bool = False) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise FaultConfigError(f"{name} must be {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise FaultConfigError(f"{name} must be a finite number, got {text!r}")
    return value


class FaultPlan:
    """Decides which requests fail: exactly `error_rate` of every run of requests, spread evenly.

    Deterministic rather than random, so a drill or a test sees the share it asked for on any count.
    """

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._ppm = round(faults.error_rate * _PPM)
        self._seen = 0
        self._lock = threading.Lock()

    def next_fails(self) -> bool:
        with self._lock:
            n = self._seen
            self._seen += 1
        return (n + 1) * self._ppm // _PPM > n * self._ppm // _PPM


# ------------------------------------------------------------------------------------------ ASGI layer


def _find_routes(app: Any) -> list | None:
    """The route table of a Starlette/FastAPI app, looking through middleware that wraps it (`.app`)."""
    for _ in range(16):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


_ID_SEGMENT = re.compile(r"[0-9]+|[0-9a-fA-F-]{32,36}|[^/]{40,}")


def path_template(path: str) -> str:
    """A route label for a path no route table explains: numeric, UUID and very long segments become {id}."""
    return "/".join("{id}" if _ID_SEGMENT.fullmatch(s) else s for s in path.split("/"))


class Instrumented:
    """ASGI middleware: serves `GET /metrics`, counts and times every other request, injects faults if set."""

    def __init__(self, app: Any, faults: Faults | None = None, *, clock: Callable[[], float] = time.perf_counter):
        self.app = app
        self.faults = faults if faults and faults.active else None
        self._plan = FaultPlan(self.faults) if self.faults else None
        self.metrics = RequestMetrics(("method", "route"))
        self._injected = {"error": 0, "latency": 0}
        self._routes_seen: set[str] = set()
        self._clock = clock

    def route_of(self, scope: dict) -> str:
        routes = _find_routes(self.app)
        if routes is None:
            route = path_template(scope.get("path", ""))
        else:
            route = UNMATCHED
            for candidate in routes:
                try:
                    match, _ = candidate.matches(scope)
                except Exception:  # noqa: BLE001, S112 - a route that cannot match this scope does not match it
                    continue
                name = getattr(match, "name", "")
                if name == "FULL" or (name == "PARTIAL" and route == UNMATCHED):
                    route = getattr(candidate, "path", None) or UNMATCHED
                    if name == "FULL":
                        break
        if route not in self._routes_seen:
            if len(self._routes_seen) >= MAX_ROUTES:
                return "other"
            self._routes_seen.add(route)
        return route

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == METRICS_PATH:
            await self._serve_metrics(method, send)
            return
        route = self.route_of(scope)
        labels_ = (method, route)
        status = ["500"]  # what the client sees if the app raises before it starts an answer
        started = self._clock()

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        self.metrics.started((method,))
        try:
            if self._plan is not None and path not in FAULT_EXEMPT and await self._inject(send_and_note):
                return
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.observe(labels_, status[0], self._clock() - started, group=(method,))

    async def _inject(self, send: Callable) -> bool:
        """Delay the request and/or answer it with an injected error; True when the app must not see it."""
        faults = self.faults
        assert faults is not None and self._plan is not None
        if faults.latency_ms > 0:
            import asyncio

            self._injected["latency"] += 1
            await asyncio.sleep(faults.latency_ms / 1000)
        if not self._plan.next_fails():
            return False
        self._injected["error"] += 1
        body = json.dumps({"detail": f"injected fault ({ERROR_RATE_VAR}={faults.error_rate:g})"}).encode()
        await send({"type": "http.response.start", "status": faults.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-codemind-fault", b"error")]})
        await send({"type": "http.response.body", "body": body})
        return True

    def render(self) -> bytes:
        lines = self.metrics.render(("method",))
        if self.faults is not None:
            f = self.faults
            lines += ["# HELP codemind_fault_injection_config Fault injection this process was started with.",
                      "# TYPE codemind_fault_injection_config gauge",
                      f'codemind_fault_injection_config{{setting="error_rate"}} {number(f.error_rate)}',
                      f'codemind_fault_injection_config{{setting="latency_ms"}} {number(f.latency_ms)}',
                      f'codemind_fault_injection_config{{setting="status"}} {f.status}',
                      "# HELP codemind_faults_injected_total Requests delayed or failed on purpose.",
                      "# TYPE codemind_faults_injected_total counter"]
            lines += [f'codemind_faults_injected_total{{kind="{k}"}} {n}' for k, n in sorted(self._injected.items())]
        return exposition(lines + process_metrics())

    async def _serve_metrics(self, method: str, send: Callable) -> None:
        if method not in ("GET", "HEAD"):
            body = json.dumps({"detail": f"{method} {METRICS_PATH}: only GET is allowed"}).encode()
            headers = [(b"content-type", b"application/json"), (b"allow", b"GET, HEAD")]
            status = 405
        else:
            body, status = self.render(), 200
            headers = [(b"content-type", CONTENT_TYPE.encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


def instrument(app: Any, faults: Faults | None = None) -> Instrumented:
    """Wrap an ASGI app with /metrics and, when `faults` is given and active, fault injection."""
    return Instrumented(app, faults)


def load_app(environ: Mapping[str, str] | None = None) -> Instrumented:
    """The bundle's `service.app:app`, instrumented, with the faults its environment asks for."""
    faults = Faults.from_env(environ)  # a bad setting stops the process here, with the variable's name
    inner = importlib.import_module("service.app").app
    if faults is not None:
        print(f"codemind_service: fault injection on: {faults}", file=sys.stderr, flush=True)
    return instrument(inner, faults)


_app: Instrumented | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn codemind_service:app` builds the app on first access; importing the module for its classes
    # (the proxy, the contract tests) does not import the service.
    global _app
    if name == "app":
        if _app is None:
            _app = load_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
