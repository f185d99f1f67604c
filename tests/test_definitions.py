"""The definitions surface: a snapshot of assets, checks, jobs and sensors, and a light import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from codemind_dagster.definitions import build_definitions

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def surface(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name, "kinds": sorted(node.kinds), "owners": list(node.owners),
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitions": type(node.partitions_def).__name__ if node.partitions_def else None,
            "has_description": bool(node.description),
        }
    checks = sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys)
    blocking = sorted(f"{s.asset_key.to_user_string()}:{s.name}" for a in graph.assets_defs
                      for s in a.check_specs if s.blocking)
    jobs = sorted(j.name for j in defs.jobs or [])
    sensors = {s.name: {"default_status": s.default_status.value, "interval_s": s.minimum_interval_seconds}
               for s in defs.sensors or []}
    schedules = {s.name: {"cron": s.cron_schedule, "default_status": s.default_status.value, "job": s.job_name}
                 for s in defs.schedules or []}
    return {"assets": assets, "checks": checks, "blocking_checks": blocking, "jobs": jobs, "sensors": sensors,
            "schedules": schedules, "resources": sorted(defs.resources)}


def test_definitions_surface_matches_the_snapshot(settings):
    current = surface(build_definitions(settings))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert current == expected, "the definitions surface changed; rerun with UPDATE_SNAPSHOTS=1 if intended"


def test_definitions_import_no_heavy_modules():
    code = ("import sys, codemind_dagster.definitions as d; d.defs.resolve_asset_graph(); "
            "print(','.join(m for m in ('kubernetes', 'boto3', 'great_expectations', 'fastapi', 'uvicorn', "
            "'alembic', 'anthropic', 'openai', 'psycopg2', 'redis', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pipeline_steps_share_one_process_locally(settings):
    """Locally a process per step would cost more than the steps (k8s: see the next tests)."""
    assert build_definitions(settings).resolve_job_def("deliver_intent").executor_def.name == "in_process"


def test_k8s_profile_refuses_sqlite(settings):
    """The k8s profile names the setting it needs instead of running on an embedded SQLite file."""
    import pytest

    with pytest.raises(RuntimeError, match="set CODEMIND_DATABASE_URL"):
        build_definitions(settings.model_copy(update={"profile": "k8s"}))


def test_k8s_profile_loads_fast_without_a_cluster(settings, tmp_path):
    """Definitions of the k8s profile load with no cluster up and without importing the kubernetes client."""
    code = ("import sys, codemind_dagster.definitions as d; "
            "print(type(d.defs.resources['runtime']).__name__, d.defs.resolve_job_def('deliver_intent').executor_def.name, "
            "'kubernetes' in sys.modules)")
    env = {**os.environ, "CODEMIND_PROFILE": "k8s", "CODEMIND_DATABASE_URL": "postgresql+psycopg2://u@127.0.0.1:1/x",
           "CODEMIND_KUBECONFIG": str(tmp_path / "missing")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["KubeRuntimeResource", "k8s_step_jobs", "False"]


def test_dagster_tools_load_the_code_location(settings, tmp_path):
    dagster = str(Path(sys.executable).with_name("dagster"))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run([dagster, "definitions", "validate", "-m", "codemind_dagster.definitions"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_k8s_run_pods_get_absolute_paths_and_no_secret_values(tmp_path, monkeypatch):
    """A run pod starts in another directory than the launcher: a relative home must reach it resolved."""
    from codemind_dagster.instance import dagster_config
    from codemind_dagster.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CODEMIND_HOME", ".codemind")
    monkeypatch.delenv("CODEMIND_KUBECONFIG", raising=False)
    monkeypatch.setenv("CODEMIND_PROFILE", "k8s")
    monkeypatch.setenv("CODEMIND_DATABASE_URL", "postgresql+psycopg2://u:s3cret-pw@127.0.0.1:1/x")
    launcher = dagster_config(Settings.from_env())["run_launcher"]["config"]
    env = launcher["env_vars"]
    assert f"CODEMIND_HOME={tmp_path.resolve() / '.codemind'}" in env
    assert f"CODEMIND_KUBECONFIG={tmp_path.resolve() / '.codemind' / 'kube' / 'config'}" in env
    assert "CODEMIND_DATABASE_URL" in env and "s3cret-pw" not in json.dumps(launcher)
