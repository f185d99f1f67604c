"""infrastructure_state: drift rules, real deployments vs records, supporting-service probes, check and CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import dagster as dg
import psutil
import pytest
from click.testing import CliRunner

from codemind_dagster.assets.platform import collect_state, defs, infrastructure_state
from codemind_dagster.commands.state import state
from codemind_dagster.domain.drift import Drift, ObservedService, compute_drift
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.probes import probe_database, probe_graph_store, probe_redis, probe_supporting

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
A, B = "a" * 64, "b" * 64


def svc(intent="shop", env="dev", artifact=A, pid=100, healthy=True, port=8000) -> ObservedService:
    return ObservedService(intent=intent, environment=env, artifact=artifact, pid=pid, healthy=healthy, port=port)


# ---- pure drift rules -----------------------------------------------------------------------------


def test_matching_state_has_no_drift():
    assert compute_drift({("shop", "dev"): A}, [svc()]) == []
    assert compute_drift({}, []) == []


def test_missing_when_nothing_runs_or_the_process_is_gone():
    [d] = compute_drift({("shop", "dev"): A}, [])
    assert (d.kind, d.intent, d.environment) == ("missing", "shop", "dev")
    assert "aaaaaaaaaaaa" in d.detail and "no such service" in d.detail
    [d] = compute_drift({("shop", "dev"): A}, [svc(pid=None, healthy=False)])
    assert d.kind == "missing" and "no process of it is running" in d.detail


def test_unexpected_when_running_without_a_record():
    [d] = compute_drift({}, [svc(env="staging", pid=4242)])
    assert (d.kind, d.environment) == ("unexpected", "staging")
    assert "pid 4242" in d.detail and "no live deployment record" in d.detail
    # Known to the runtime but dead, and wanted by nobody: nothing to report.
    assert compute_drift({}, [svc(pid=None, healthy=False)]) == []


def test_wrong_artifact_names_both_hashes():
    [d] = compute_drift({("shop", "dev"): A}, [svc(artifact=B, healthy=False)])
    assert d.kind == "wrong_artifact"
    assert "aaaaaaaaaaaa" in d.detail and "bbbbbbbbbbbb" in d.detail and "unhealthy" in d.detail


def test_unhealthy_when_the_right_artifact_fails_its_health_check():
    [d] = compute_drift({("shop", "dev"): A}, [svc(healthy=False, pid=77, port=9001)])
    assert d.kind == "unhealthy" and "pid 77" in d.detail and "port 9001" in d.detail


def test_drift_is_sorted_and_deterministic():
    desired = {("b", "dev"): A, ("a", "staging"): A, ("a", "dev"): A, ("c", "dev"): A}
    observed = [svc("z", "dev"), svc("c", "dev", healthy=False), svc("a", "dev", artifact=B)]
    first = compute_drift(desired, observed)
    assert first == compute_drift(dict(reversed(desired.items())), list(reversed(observed)))
    assert [(d.intent, d.environment, d.kind) for d in first] == [
        ("a", "dev", "wrong_artifact"), ("a", "staging", "missing"), ("b", "dev", "missing"),
        ("c", "dev", "unhealthy"), ("z", "dev", "unexpected")]
    assert all(isinstance(d, Drift) for d in first)


# ---- against a real local deployment -----------------------------------------------------------------


@pytest.fixture
def deployed(settings, examples, runtime_cleanup):
    """inventory-catalog rendered, stored and running in dev; returns (db, runtime, artifact, bundle_dir)."""
    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.domain.intent import read_intent_file
    from codemind_dagster.resources.artifacts import LocalArtifactStore
    from codemind_dagster.resources.runtime import LocalRuntime

    files = render_service(read_intent_file(examples / "inventory-catalog.yaml"))
    store = LocalArtifactStore(settings.artifacts_dir)
    artifact = store.put_bundle(files)
    runtime = LocalRuntime(settings.runtime_dir, health_timeout_s=settings.health_timeout_s)
    outcome = runtime.deploy(service="inventory-catalog", environment="dev", artifact=artifact,
                             bundle_dir=store.bundle_dir(artifact))
    assert outcome.ok, outcome.reason
    db = PlatformDB(settings.db_url)
    db.migrate()
    dep = db.start_deployment("inventory-catalog", "dev", artifact, None)
    db.finish_deployment(dep, "live", url=outcome.url, pid=outcome.pid)
    return db, runtime, artifact, store.bundle_dir(artifact)


def _drift(doc) -> set[tuple[str, str, str]]:
    return {(d["intent"], d["environment"], d["kind"]) for d in doc["drift"]}


@pytest.mark.slow
def test_live_deployment_matches_then_a_killed_process_is_drift(deployed):
    db, runtime, artifact, _ = deployed
    doc = collect_state(db, runtime, None)
    assert doc["drift"] == []
    [s] = doc["services"]
    assert (s["intent"], s["environment"], s["artifact"], s["desired_artifact"]) == (
        "inventory-catalog", "dev", artifact, artifact)
    assert s["healthy"] and s["running"] and s["pid"] and s["port"]
    assert s["memory_rss_bytes"] > 0 and s["uptime_s"] >= 0
    dev = next(e for e in doc["environments"] if e["name"] == "dev")
    assert dev == {"name": "dev", "desired": 1, "running": 1, "healthy": 1, "drift": 0}
    assert [e["name"] for e in doc["environments"]] == ["dev", "staging", "production"]

    os.kill(s["pid"], signal.SIGKILL)
    psutil.Process(s["pid"]).wait(timeout=10)
    doc = collect_state(db, runtime, None)
    [d] = doc["drift"]
    assert (d["intent"], d["environment"]) == ("inventory-catalog", "dev")
    assert d["kind"] in ("missing", "unhealthy")
    assert artifact[:12] in d["detail"] and ("no process" in d["detail"] or "health check fails" in d["detail"])


@pytest.mark.slow
def test_unrecorded_service_is_unexpected_and_a_foreign_record_is_wrong_artifact(deployed):
    db, runtime, artifact, bundle = deployed
    outcome = runtime.deploy(service="inventory-catalog", environment="staging", artifact=artifact,
                             bundle_dir=bundle)
    assert outcome.ok, outcome.reason
    doc = collect_state(db, runtime, None)
    assert _drift(doc) == {("inventory-catalog", "staging", "unexpected")}
    assert str(outcome.pid) in doc["drift"][0]["detail"]

    other = "f" * 64
    dep = db.start_deployment("inventory-catalog", "staging", other, None)
    db.finish_deployment(dep, "live", url=outcome.url, pid=outcome.pid)
    doc = collect_state(db, runtime, None)
    [d] = doc["drift"]
    assert (d["environment"], d["kind"]) == ("staging", "wrong_artifact")
    assert other[:12] in d["detail"] and artifact[:12] in d["detail"]


# ---- supporting services ------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_probe_against_the_local_server():
    p = probe_redis(LOCAL_REDIS)
    assert p["name"] == "redis" and p["healthy"], p
    assert p["latency_ms"] > 0 and "PONG" in p["detail"]


def test_redis_probe_of_a_closed_port_is_unhealthy_and_fast():
    port = _closed_port()
    started = time.monotonic()
    p = probe_redis(f"redis://:hunter2@127.0.0.1:{port}/0", timeout_s=0.5)
    assert time.monotonic() - started < 2
    assert not p["healthy"] and str(port) in p["detail"] and "Connection" in p["detail"]
    assert "hunter2" not in json.dumps(p)
    assert not probe_redis("not a url")["healthy"]


def test_database_and_graph_probes(db: PlatformDB, tmp_path):
    assert probe_database(db)["healthy"] and probe_graph_store(db)["healthy"]
    assert [p["name"] for p in probe_supporting(db, None)] == ["platform_db", "graph_store"]
    assert [p["name"] for p in probe_supporting(db, LOCAL_REDIS)] == ["platform_db", "graph_store", "redis"]
    # A database without the graph tables, and one that cannot be opened at all: reported, never raised.
    empty = PlatformDB(f"sqlite:///{tmp_path / 'empty.db'}")
    assert probe_database(empty)["healthy"]
    g = probe_graph_store(empty)
    assert not g["healthy"] and "graph_nodes" in g["detail"]
    (tmp_path / "adir").mkdir()
    broken = PlatformDB(f"sqlite:///{tmp_path / 'adir'}")
    p = probe_database(broken)
    assert not p["healthy"] and p["detail"]


# ---- the asset, its check, the job, the schedule and the CLI -------------------------------------------------


def _resources(settings, redis_url=None):
    from codemind_dagster.resources.platform import DatabaseResource, RuntimeResource
    from codemind_dagster.resources.probes import ProbeResource

    return {"database": DatabaseResource(url=settings.db_url),
            "runtime": RuntimeResource(root=str(settings.runtime_dir), health_timeout_s=5),
            "probes": ProbeResource(redis_url=redis_url)}


def test_drift_check_warns_without_failing_the_materialization(settings):
    from codemind_dagster.resources.platform import DatabaseResource

    db = DatabaseResource(url=settings.db_url).client()
    dep = db.start_deployment("ghost", "production", A, None)
    db.finish_deployment(dep, "live")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([infrastructure_state], instance=instance,
                                resources=_resources(settings, LOCAL_REDIS))
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "no_drift" and check.passed is False
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert "ghost" in check.metadata["drift"].value and check.metadata["drift_count"].value == 1
    [mat] = result.asset_materializations_for_node("infrastructure_state")
    assert mat.metadata["drift_count"].value == 1 and "missing" in mat.metadata["drift"].value
    assert "redis" in mat.metadata["supporting"].value and mat.metadata["latency_ms_redis"].value > 0
    doc = result.output_for_node("infrastructure_state")
    assert _drift(doc) == {("ghost", "production", "missing")}


def test_check_passes_when_nothing_drifts(settings):
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([infrastructure_state], instance=instance, resources=_resources(settings))
    [check] = result.get_asset_check_evaluations()
    assert result.success and check.passed


def test_defs_job_and_hourly_schedule_load_with_resources(settings):
    merged = dg.Definitions.merge(defs, dg.Definitions(resources=_resources(settings)))
    job = merged.resolve_job_def("refresh_infrastructure_state")
    schedule = merged.resolve_schedule_def("infrastructure_state_hourly")
    assert schedule.cron_schedule == "0 * * * *" and schedule.job_name == job.name
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    spec = merged.resolve_assets_def("infrastructure_state")
    assert spec.group_names_by_key[dg.AssetKey("infrastructure_state")] == "platform"
    [check_key] = spec.check_keys
    assert check_key.name == "no_drift"
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)
    assert result.success


def test_state_command_prints_json_and_records_the_materialization(settings, monkeypatch):
    monkeypatch.setenv("CODEMIND_REDIS_URL", LOCAL_REDIS)
    r = CliRunner().invoke(state, ["--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"environments", "services", "drift", "supporting"} <= set(doc)
    assert [e["name"] for e in doc["environments"]] == ["dev", "staging", "production"]
    assert {p["name"]: p["healthy"] for p in doc["supporting"]} == {
        "platform_db": True, "graph_store": True, "redis": True}
    assert doc["drift"] == [] and doc["services"] == []

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("infrastructure_state"))
    assert event is not None

    r = CliRunner().invoke(state, [])
    assert r.exit_code == 0 and "Supporting services" in r.stdout and "no drift" in r.stdout
