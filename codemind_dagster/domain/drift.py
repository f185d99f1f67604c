"""Drift between what the deployment records say should run and what the runtime reports running."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

DRIFT_KINDS = ("missing", "unexpected", "wrong_artifact", "unhealthy")


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

    @property
    def running(self) -> bool:
        return self.pid is not None

    @classmethod
    def from_status(cls, status: Any) -> ObservedService:
        """From any status object exposing the RuntimeStatus attributes (`service` names the intent)."""
        return cls(
            intent=status.service, environment=status.environment, artifact=status.artifact,
            pid=status.pid, healthy=bool(status.healthy), url=getattr(status, "url", None),
            port=getattr(status, "port", None), uptime_s=getattr(status, "uptime_s", None),
            memory_rss_bytes=getattr(status, "memory_rss_bytes", None),
            started_at=getattr(status, "started_at", None),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "running": self.running}


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


def compute_drift(desired: Mapping[tuple[str, str], str], observed: Iterable[ObservedService]) -> list[Drift]:
    """Every difference between desired {(intent, env): artifact} and the observed services, sorted."""
    by_key: dict[tuple[str, str], list[ObservedService]] = {}
    for svc in observed:
        by_key.setdefault((svc.intent, svc.environment), []).append(svc)
    found: list[Drift] = []
    for key in sorted(set(desired) | set(by_key)):
        intent, env = key
        want = desired.get(key)
        services = by_key.get(key, [])
        running = [s for s in services if s.running]
        if want is None:
            # A known but dead service that nobody wants is no drift: nothing runs, nothing should.
            for s in running:
                found.append(Drift(intent, env, "unexpected",
                                   f"pid {s.pid} runs {_short(s.artifact)}{_where(s)} "
                                   "but no live deployment record asks for it"))
            continue
        if not running:
            if services:
                gone = ", ".join(sorted({_short(s.artifact) for s in services}))
                why = f"the runtime knows {gone} but no process of it is running (health check fails)"
            else:
                why = "the runtime reports no such service"
            found.append(Drift(intent, env, "missing", f"records say {_short(want)} is live; {why}"))
            continue
        right = [s for s in running if s.artifact == want]
        if not right:
            others = ", ".join(f"{_short(s.artifact)} (pid {s.pid}{'' if s.healthy else ', unhealthy'})"
                               for s in sorted(running, key=lambda s: (s.artifact, s.pid or 0)))
            found.append(Drift(intent, env, "wrong_artifact",
                               f"records say {_short(want)} is live; running instead: {others}"))
            continue
        if not any(s.healthy for s in right):
            pids = ", ".join(str(s.pid) for s in sorted(right, key=lambda s: s.pid or 0))
            found.append(Drift(intent, env, "unhealthy",
                               f"pid {pids} runs {_short(want)}{_where(right[0])} but its health check fails"))
    return sorted(found)


def _where(s: ObservedService) -> str:
    return f" on port {s.port}" if s.port else ""


def drift_markdown(drift: Iterable[Drift]) -> str:
    rows = [f"| {d.intent} | {d.environment} | {d.kind} | {d.detail.replace('|', '/')} |" for d in drift]
    if not rows:
        return "no drift"
    return "\n".join(["| intent | environment | kind | detail |", "|---|---|---|---|", *rows])
