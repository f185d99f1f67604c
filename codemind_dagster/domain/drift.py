"""Drift between what the deployment records say should run and what the runtime reports running."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

DRIFT_KINDS = ("missing", "unexpected", "wrong_artifact", "unhealthy", "modified", "unobserved")


@dataclass(frozen=True)
class ObservedService:
    """One (intent, environment) as a runtime reports it; any runtime (local processes, k8s) can fill it."""

    intent: str
    environment: str
    artifact: str
    pid: int | None  # None: the runtime knows the service but no process of it is running
    healthy: bool
    url: str | None = None
    port: int | None = None
    uptime_s: float | None = None
    memory_rss_bytes: int | None = None
    started_at: str | None = None
    pods_ready: int | None = None  # None: the runtime runs processes, not pods
    findings: tuple[str, ...] = ()  # hand edits of what the platform applied, as the runtime saw them

    @property
    def running(self) -> bool:
        return self.pid is not None or (self.pods_ready or 0) > 0

    @classmethod
    def from_status(cls, status: Any) -> ObservedService:
        """From any status object exposing the RuntimeStatus attributes (`service` names the intent)."""
        return cls(
            intent=status.service, environment=status.environment, artifact=status.artifact,
            pid=status.pid, healthy=bool(status.healthy), url=getattr(status, "url", None),
            port=getattr(status, "port", None), uptime_s=getattr(status, "uptime_s", None),
            memory_rss_bytes=getattr(status, "memory_rss_bytes", None),
            started_at=getattr(status, "started_at", None),
            pods_ready=getattr(status, "pods_ready", None),
            findings=tuple(getattr(status, "findings", None) or ()),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "findings": list(self.findings), "running": self.running}

    def who(self) -> str:
        """What serves it, in the runtime's own terms: a pid or a count of ready pods."""
        if self.pid is not None:
            return f"pid {self.pid}"
        return f"{self.pods_ready or 0} ready pod(s)"


@dataclass(frozen=True, order=True)
class Drift:
    intent: str
    environment: str
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _short(artifact: str) -> str:
    return artifact[:12]


def compute_drift(desired: Mapping[tuple[str, str], str], observed: Iterable[ObservedService],
                  unobserved: Mapping[str, str] | None = None) -> list[Drift]:
    """Every difference between desired {(intent, env): artifact} and the observed services, sorted.

    One drift per (intent, environment): the first of missing, wrong_artifact, unhealthy, modified that
    applies; hand edits the runtime found are added to the detail of whichever it is. An environment in
    `unobserved` ({environment: why}) could not be looked at: its records are "unobserved", never "missing".
    """
    unobserved = unobserved or {}
    by_key: dict[tuple[str, str], list[ObservedService]] = {}
    for svc in observed:
        by_key.setdefault((svc.intent, svc.environment), []).append(svc)
    found: list[Drift] = []
    for key in sorted(set(desired) | set(by_key)):
        intent, env = key
        want = desired.get(key)
        services = by_key.get(key, [])
        running = [s for s in services if s.running]
        edits = _findings(services)
        if env in unobserved:
            if want is not None:
                found.append(Drift(intent, env, "unobserved",
                                   f"records say {_short(want)} is live; cannot check: {unobserved[env]}"))
            continue
        if want is None:
            # A known but dead service that nobody wants is no drift: nothing runs, nothing should.
            for s in running:
                found.append(Drift(intent, env, "unexpected",
                                   f"{_runs([s])} {_short(s.artifact)}{_where(s)} "
                                   f"but no live deployment record asks for it{edits}"))
            continue
        if not running:
            if services:
                gone = ", ".join(sorted({_short(s.artifact) for s in services}))
                what = ("no pod of it is ready" if any(s.pods_ready is not None for s in services)
                        else "no process of it is running (health check fails)")
                why = f"the runtime knows {gone} but {what}"
            else:
                why = "the runtime reports no such service"
            found.append(Drift(intent, env, "missing", f"records say {_short(want)} is live; {why}{edits}"))
            continue
        right = [s for s in running if s.artifact == want]
        if not right:
            others = ", ".join(f"{_short(s.artifact)} ({s.who()}{'' if s.healthy else ', unhealthy'})"
                               for s in sorted(running, key=lambda s: (s.artifact, s.pid or 0)))
            found.append(Drift(intent, env, "wrong_artifact",
                               f"records say {_short(want)} is live; running instead: {others}{edits}"))
            continue
        if not any(s.healthy for s in right):
            found.append(Drift(intent, env, "unhealthy",
                               f"{_runs(right)} {_short(want)}{_where(right[0])} but its health check fails{edits}"))
            continue
        if edits:
            found.append(Drift(intent, env, "modified",
                               f"{_short(want)} runs as recorded but was changed by hand{edits}"))
    return sorted(found)


def _runs(services: list[ObservedService]) -> str:
    """`pid 1, 2 runs` for processes, `2 ready pod(s) run` for pods."""
    pids = sorted(s.pid for s in services if s.pid is not None)
    if pids:
        return f"pid {', '.join(map(str, pids))} runs"
    return f"{sum(s.pods_ready or 0 for s in services)} ready pod(s) run"


def _findings(services: Iterable[ObservedService]) -> str:
    seen = dict.fromkeys(f for s in services for f in s.findings)
    return "".join(f"; {f}" for f in seen)


def _where(s: ObservedService) -> str:
    return f" on port {s.port}" if s.port else ""


def drift_markdown(drift: Iterable[Drift]) -> str:
    rows = [f"| {d.intent} | {d.environment} | {d.kind} | {d.detail.replace('|', '/')} |" for d in drift]
    if not rows:
        return "no drift"
    return "\n".join(["| intent | environment | kind | detail |", "|---|---|---|---|", *rows])
