"""Platform: infrastructure_state, observed runtime vs deployment records, with a drift check."""

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import dagster as dg

from codemind_dagster.domain.drift import Drift, ObservedService, compute_drift, drift_markdown
from codemind_dagster.domain.intent import ENVIRONMENTS
from codemind_dagster.resources.backends import Backends
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.platform import DatabaseResource, RuntimeResource
from codemind_dagster.resources.probes import DEFAULT_TIMEOUT_S, ProbeResource, probe_supporting

OWNERS = ["team:platform"]
CHECK_NAME = "no_drift"


class ObservableRuntime(Protocol):
    """What infrastructure_state needs from a deploy target: LocalRuntime today, a k8s runtime later.

    `list()` returns one status per known (service, environment) with the RuntimeStatus attributes
    service, environment, artifact, pid (None when not running), healthy, and optionally url, port,
    uptime_s, memory_rss_bytes, started_at, pods_ready, findings. A runtime on clusters also has
    `inventory()` (KubeRuntime): one entry per kubeconfig context, which the document carries as `clusters`,
    and `observe()`: list() plus {environment: why} for environments whose cluster did not answer.
    """

    def list(self) -> list[Any]: ...


def _env_order(env: str) -> tuple[int, str]:
    return (ENVIRONMENTS.index(env) if env in ENVIRONMENTS else len(ENVIRONMENTS), env)


def collect_state(db: PlatformDB, runtime: ObservableRuntime, redis_url: str | None,
                  probe_timeout_s: float = DEFAULT_TIMEOUT_S, backends: Backends | None = None,
                  neo4j_password: str | None = None) -> dict[str, Any]:
    """The infrastructure_state document: environments, services, drift and supporting services."""
    desired = {key: row.artifact for key, row in db.live_deployments().items()}
    # A runtime on several clusters reports the environments it could not reach instead of failing.
    observe = getattr(runtime, "observe", None)
    statuses, unobserved = observe() if callable(observe) else (runtime.list(), {})
    observed = sorted((ObservedService.from_status(s) for s in statuses),
                      key=lambda s: (s.intent, _env_order(s.environment), s.pid or 0))
    drift = compute_drift(desired, observed, unobserved)
    envs = sorted({*ENVIRONMENTS, *(e for _, e in desired), *(s.environment for s in observed)}, key=_env_order)
    environments = [{
        "name": env,
        "desired": sum(1 for _, e in desired if e == env),
        "running": sum(1 for s in observed if s.environment == env and s.running),
        "healthy": sum(1 for s in observed if s.environment == env and s.running and s.healthy),
        "drift": sum(1 for d in drift if d.environment == env),
        **({"unobserved": unobserved[env]} if env in unobserved else {}),
    } for env in envs]
    services = [{**s.as_dict(), "desired_artifact": desired.get((s.intent, s.environment))} for s in observed]
    doc: dict[str, Any] = {
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environments": environments,
        "services": services,
        "drift": [d.as_dict() for d in drift],
        "supporting": probe_supporting(db, redis_url, probe_timeout_s, backends, neo4j_password),
        "backends": (backends or Backends()).active(),
    }
    inventory = getattr(runtime, "inventory", None)
    if callable(inventory):
        doc["clusters"] = inventory()
    return doc


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "none"
    cell = lambda v: "-" if v is None else str(v).replace("|", "/")
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


def serving(s: dict[str, Any]) -> str | None:
    """The pid of a process, or `N ready pod(s)` of a workload on a cluster."""
    if s["pid"] is not None:
        return str(s["pid"])
    return f"{s['pods_ready']} ready pod(s)" if s.get("pods_ready") is not None else None


def services_markdown(services: list[dict[str, Any]]) -> str:
    return _md_table(
        ["intent", "environment", "artifact", "pid / pods", "port", "healthy", "uptime_s", "rss_mb"],
        [[s["intent"], s["environment"], s["artifact"][:12], serving(s), s["port"], s["healthy"], s["uptime_s"],
          round(s["memory_rss_bytes"] / 2**20, 1) if s["memory_rss_bytes"] else None] for s in services])


def clusters_markdown(clusters: list[dict[str, Any]]) -> str:
    """Per context a summary row, then every workload and pod of the configured namespaces."""
    from codemind_dagster.resources.kube_state import SUMMARY_HEADERS, summary_rows

    parts = [_md_table(SUMMARY_HEADERS, summary_rows(clusters))]
    up = [c for c in clusters if c["reachable"]]
    workloads = [[c["context"], "Deployment", d["namespace"], d["name"], d["artifact"] and d["artifact"][:12],
                  f"{d['ready_replicas']}/{d['replicas']}", d["revision"], "Available" if d["available"] else "-"]
                 for c in up for d in c["deployments"]]
    workloads += [[c["context"], "Rollout", r["namespace"], r["name"], r["artifact"] and r["artifact"][:12],
                   f"{r['ready_replicas']}/{r['replicas']}", r["stable_revision"],
                   f"{r['phase']}, canary weight {r['canary_weight']}"] for c in up for r in c["rollouts"]]
    if workloads:
        parts.append(_md_table(["context", "kind", "namespace", "name", "artifact", "ready", "revision", "state"],
                               workloads))
    pods = [[c["context"], p["namespace"], p["name"], p["phase"], p["ready"], p["restarts"], p["node"], p["pod_ip"]]
            for c in up for p in c["pods"]]
    if pods:
        parts.append(_md_table(["context", "namespace", "pod", "phase", "ready", "restarts", "node", "pod_ip"], pods))
    return "\n\n".join(parts)


def supporting_markdown(supporting: list[dict[str, Any]]) -> str:
    return _md_table(["service", "healthy", "latency_ms", "detail"],
                     [[p["name"], p["healthy"], p["latency_ms"], p["detail"]] for p in supporting])


def _drift_md(doc: dict[str, Any]) -> str:
    return drift_markdown(Drift(**d) for d in doc["drift"])


@dg.asset(
    group_name="platform", kinds={"python"}, owners=OWNERS,
    description="What runs in every environment (artifact, pid, port, health, uptime, memory) against the "
                "live deployment records, the drift between them, and health and latency of the platform "
                "DB, graph store and Redis; on clusters also nodes, workloads and pods of every kubeconfig context.",
    check_specs=[dg.AssetCheckSpec(
        CHECK_NAME, asset="infrastructure_state", blocking=False,
        description="Warns when what runs differs from the deployment records: missing, unexpected, "
                    "wrong artifact, unhealthy or hand-modified services.")],
)
def infrastructure_state(context: dg.AssetExecutionContext, database: DatabaseResource,
                         runtime: RuntimeResource, probes: ProbeResource) -> Iterator[Any]:
    doc = collect_state(database.client(), runtime.runtime(), probes.redis_url, probes.timeout_s,
                        probes.backends(), probes.neo4j_password)
    drift_md = _drift_md(doc)
    running = sum(e["running"] for e in doc["environments"])
    unhealthy = [p["name"] for p in doc["supporting"] if not p["healthy"]]
    if unhealthy:
        context.log.warning(f"supporting services unhealthy: {', '.join(unhealthy)}")
    for c in doc.get("clusters", []):
        if not c["reachable"]:
            context.log.warning(f"cluster context {c['context']} unreachable: {c['error']}")
    metadata: dict[str, Any] = {
        "services_running": running,
        "services_healthy": sum(e["healthy"] for e in doc["environments"]),
        "services_desired": sum(e["desired"] for e in doc["environments"]),
        "drift_count": len(doc["drift"]),
        "drift": dg.MetadataValue.md(drift_md),
        "services": dg.MetadataValue.md(services_markdown(doc["services"])),
        "supporting": dg.MetadataValue.md(supporting_markdown(doc["supporting"])),
        "supporting_unhealthy": len(unhealthy),
        **({"clusters": dg.MetadataValue.md(clusters_markdown(doc["clusters"])),
            "clusters_unreachable": sum(not c["reachable"] for c in doc["clusters"])} if "clusters" in doc else {}),
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
