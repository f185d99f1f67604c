"""`codemind state`: refresh infrastructure_state on the local Dagster instance and print it."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

# The run's events still reach the instance; only the console echo of each DEBUG event is dropped.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

@click.command("state")
@click.option("--json", "as_json", is_flag=True, help="Print the state document as JSON.")
def state(as_json: bool) -> None:
    """Materialize infrastructure_state (what runs vs the deployment records) and print it.

    The run is recorded on the local Dagster instance, so the UI shows it in the asset's history.
    Drift is reported, not fatal: the exit code is 0 whenever the state could be collected.
    """
    try:
        doc = refresh_state()
    except RuntimeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    print_state(doc)


def _resources(settings) -> dict[str, Any]:
    from codemind_dagster.resources.probes import ProbeResource
    from codemind_dagster.resources.profiles import resources_for

    res = resources_for(settings)
    # EnvVar keeps a password in the URL out of the run's recorded resource config.
    res.setdefault("probes", ProbeResource.from_settings(settings))
    return res


def refresh_state() -> dict[str, Any]:
    """Run refresh_infrastructure_state in-process; returns the document, raises RuntimeError on failure."""
    import dagster as dg

    from codemind_dagster.assets.platform import defs
    from codemind_dagster.instance import get_instance
    from codemind_dagster.settings import Settings

    settings = Settings.from_env()
    job = dg.Definitions.merge(defs, dg.Definitions(resources=_resources(settings))).resolve_job_def(
        "refresh_infrastructure_state")
    instance = get_instance(settings)
    try:
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET,
                                        tags={"codemind/trigger": "cli"})
        if not result.success:
            failure = result.failure_data_for_node("infrastructure_state")
            why = failure.error.message.strip() if failure and failure.error else "see the run in the Dagster UI"
            raise RuntimeError(f"infrastructure_state failed (run {result.run_id}): {why}")
        return result.output_for_node("infrastructure_state")
    finally:
        instance.dispose()


def print_state(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from codemind_dagster.assets.platform import serving

    out = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)
    mark = lambda ok: "[green]●[/]" if ok else "[red]○[/]"

    envs = Table(title=f"Environments ({doc['collected_at']})")
    for col in ("environment", "desired", "running", "healthy", "drift"):
        envs.add_column(col)
    for e in doc["environments"]:
        drift = f"[red]{e['drift']}[/]" if e["drift"] else "0"
        name = f"{e['name']} [red](unreachable)[/]" if e.get("unobserved") else e["name"]
        envs.add_row(name, str(e["desired"]), str(e["running"]), str(e["healthy"]), drift)
    out.print(envs)

    services = Table(title="Services")
    for col in ("intent", "env", "artifact", "pid / pods", "port", "health", "uptime", "memory"):
        services.add_column(col)
    for s in doc["services"]:
        uptime = f"{s['uptime_s']:.0f}s" if s["uptime_s"] is not None else "-"
        rss = f"{s['memory_rss_bytes'] / 2**20:.1f} MiB" if s["memory_rss_bytes"] else "-"
        services.add_row(s["intent"], s["environment"], s["artifact"][:12], serving(s) or "-",
                         str(s["port"] or "-"), mark(s["healthy"]), uptime, rss)
    out.print(services if doc["services"] else "no services known to the runtime")

    support = Table(title="Supporting services")
    for col in ("service", "health", "latency", "detail"):
        support.add_column(col)
    for p in doc["supporting"]:
        support.add_row(p["name"], mark(p["healthy"]), f"{p['latency_ms']:.1f} ms", p["detail"])
    out.print(support)
    if doc.get("backends"):
        stores = Table(title="Backends")
        for col in ("role", "backend", "target"):
            stores.add_column(col)
        for b in doc["backends"]:
            stores.add_row(b["role"], b["backend"], b["target"])
        out.print(stores)
    if "clusters" in doc:
        print_clusters(out, doc["clusters"])

    if not doc["drift"]:
        out.print("[green]no drift[/]: what runs matches the deployment records")
        return
    drift = Table(title="Drift", title_style="bold red")
    for col in ("intent", "environment", "kind", "detail"):
        drift.add_column(col)
    for d in doc["drift"]:
        drift.add_row(d["intent"], d["environment"], d["kind"], d["detail"])
    out.print(drift)


def print_clusters(out, clusters: list[dict[str, Any]]) -> None:
    """A row per kubeconfig context, then the workloads and pods of the configured namespaces."""
    from rich.table import Table

    from codemind_dagster.resources.kube_state import SUMMARY_HEADERS, summary_rows

    summary = Table(title="Clusters")
    for col in SUMMARY_HEADERS:
        summary.add_column(col)
    for row in summary_rows(clusters):
        reachable = "[green]yes[/]" if row[1] else "[red]no[/]"
        summary.add_row(str(row[0]), reachable, *(str(v) for v in row[2:]))
    out.print(summary if clusters else "no cluster context configured")
    up = [c for c in clusters if c["reachable"]]
    if any(c["deployments"] or c["rollouts"] for c in up):
        wl = Table(title="Workloads")
        for col in ("context", "kind", "namespace", "name", "artifact", "ready", "revision", "state"):
            wl.add_column(col)
        for c in up:
            for d in c["deployments"]:
                wl.add_row(c["context"], "Deployment", d["namespace"], d["name"], (d["artifact"] or "-")[:12],
                           f"{d['ready_replicas']}/{d['replicas']}", str(d["revision"] or "-"),
                           "Available" if d["available"] else "not available")
            for r in c["rollouts"]:
                wl.add_row(c["context"], "Rollout", r["namespace"], r["name"], (r["artifact"] or "-")[:12],
                           f"{r['ready_replicas']}/{r['replicas']}", str(r["stable_revision"] or "-"),
                           f"{r['phase']}, canary weight {r['canary_weight']}")
        out.print(wl)
    if any(c["pods"] for c in up):
        pods = Table(title="Pods")
        for col in ("context", "namespace", "pod", "phase", "ready", "restarts", "node", "pod IP"):
            pods.add_column(col)
        for c in up:
            for p in c["pods"]:
                pods.add_row(c["context"], p["namespace"], p["name"], str(p["phase"]),
                             "[green]yes[/]" if p["ready"] else "[red]no[/]", str(p["restarts"]),
                             str(p["node"] or "-"), str(p["pod_ip"] or "-"))
        out.print(pods)
