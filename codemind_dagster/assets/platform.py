"""Platform: infrastructure_state, observed runtime vs deployment records, with a drift check."""

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import dagster as dg

from codemind_dagster.domain.drift import Drift, ObservedService, compute_drift, drift_markdown
from codemind_dagster.domain.intent import ENVIRONMENTS
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.platform import DatabaseResource, RuntimeResource
from codemind_dagster.resources.probes import DEFAULT_TIMEOUT_S, ProbeResource, probe_supporting

OWNERS = ["team:platform"]
CHECK_NAME = "no_drift"


class ObservableRuntime(Protocol):
    """What infrastructure_state needs from a deploy target: LocalRuntime today, a k8s runtime later.

    `list()` returns one status per known (service, environment) with the RuntimeStatus attributes
    service, environment, artifact, pid (None when not running), healthy, and optionally url, port,
    uptime_s, memory_rss_bytes, started_at.
    """

    def list(self) -> list[Any]: ...


def _env_order(env: str) -> tuple[int, str]:
    return (ENVIRONMENTS.index(env) if env in ENVIRONMENTS else len(ENVIRONMENTS), env)


def collect_state(db: PlatformDB, runtime: ObservableRuntime, redis_url: str | None,
                  probe_timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The infrastructure_state document: environments, services, drift and supporting services."""
    desired = {key: row.artifact for key, row in db.live_deployments().items()}
    observed = sorted((ObservedService.from_status(s) for s in runtime.list()),
                      key=lambda s: (s.intent, _env_order(s.environment), s.pid or 0))
    drift = compute_drift(desired, observed)
    envs = sorted({*ENVIRONMENTS, *(e for _, e in desired), *(s.environment for s in observed)}, key=_env_order)
    environments = [{
        "name": env,
        "desired": sum(1 for _, e in desired if e == env),
        "running": sum(1 for s in observed if s.environment == env and s.running),
        "healthy": sum(1 for s in observed if s.environment == env and s.running and s.healthy),
        "drift": sum(1 for d in drift if d.environment == env),
    } for env in envs]
    services = [{**s.as_dict(), "desired_artifact": desired.get((s.intent, s.environment))} for s in observed]
    return {
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environments": environments,
        "services": services,
        "drift": [d.as_dict() for d in drift],
        "supporting": probe_supporting(db, redis_url, probe_timeout_s),
    }


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "none"
    cell = lambda v: "-" if v is None else str(v).replace("|", "/")
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


def services_markdown(services: list[dict[str, Any]]) -> str:
    return _md_table(
        ["intent", "environment", "artifact", "pid", "port", "healthy", "uptime_s", "rss_mb"],
        [[s["intent"], s["environment"], s["artifact"][:12], s["pid"], s["port"], s["healthy"], s["uptime_s"],
          round(s["memory_rss_bytes"] / 2**20, 1) if s["memory_rss_bytes"] else None] for s in services])


def supporting_markdown(supporting: list[dict[str, Any]]) -> str:
    return _md_table(["service", "healthy", "latency_ms", "detail"],
                     [[p["name"], p["healthy"], p["latency_ms"], p["detail"]] for p in supporting])


def _drift_md(doc: dict[str, Any]) -> str:
    return drift_markdown(Drift(**d) for d in doc["drift"])


@dg.asset(
    group_name="platform", kinds={"python"}, owners=OWNERS,
    description="What runs in every environment (artifact, pid, port, health, uptime, memory) against the "
                "live deployment records, the drift between them, and health and latency of the platform "
                "DB, graph store and Redis.",
    check_specs=[dg.AssetCheckSpec(
        CHECK_NAME, asset="infrastructure_state", blocking=False,
        description="Warns when what runs differs from the deployment records: missing, unexpected, "
                    "wrong artifact or unhealthy services.")],
)
def infrastructure_state(context: dg.AssetExecutionContext, database: DatabaseResource,
                         runtime: RuntimeResource, probes: ProbeResource) -> Iterator[Any]:
    doc = collect_state(database.client(), runtime.runtime(), probes.redis_url, probes.timeout_s)
    drift_md = _drift_md(doc)
    running = sum(e["running"] for e in doc["environments"])
    unhealthy = [p["name"] for p in doc["supporting"] if not p["healthy"]]
    if unhealthy:
        context.log.warning(f"supporting services unhealthy: {', '.join(unhealthy)}")
    metadata: dict[str, Any] = {
        "services_running": running,
        "services_healthy": sum(e["healthy"] for e in doc["environments"]),
        "services_desired": sum(e["desired"] for e in doc["environments"]),
        "drift_count": len(doc["drift"]),
        "drift": dg.MetadataValue.md(drift_md),
        "services": dg.MetadataValue.md(services_markdown(doc["services"])),
        "supporting": dg.MetadataValue.md(supporting_markdown(doc["supporting"])),
        "supporting_unhealthy": len(unhealthy),
        # One numeric entry per probe so the UI can plot latency over materializations.
        **{f"latency_ms_{p['name']}": float(p["latency_ms"]) for p in doc["supporting"]},
    }
    yield dg.Output(doc, metadata=metadata)
    yield dg.AssetCheckResult(
        check_name=CHECK_NAME, passed=not doc["drift"], severity=dg.AssetCheckSeverity.WARN,
        description=("what runs matches the deployment records" if not doc["drift"]
                     else f"{len(doc['drift'])} drift(s) between deployment records and runtime"),
        metadata={"drift_count": len(doc["drift"]), "drift": dg.MetadataValue.md(drift_md)},
    )


refresh_infrastructure_state = dg.define_asset_job(
    "refresh_infrastructure_state",
    selection=dg.AssetSelection.assets(infrastructure_state),
    executor_def=dg.in_process_executor,
    description="Observe every environment and the supporting services; record drift.",
)

infrastructure_state_hourly = dg.ScheduleDefinition(
    name="infrastructure_state_hourly",
    job=refresh_infrastructure_state,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refresh infrastructure_state every hour so drift shows up without anyone asking.",
)

defs = dg.Definitions(
    assets=[infrastructure_state],
    jobs=[refresh_infrastructure_state],
    schedules=[infrastructure_state_hourly],
)
