"""`codemind demo` on the k8s profile: runs and pipeline steps as Jobs, the instance on PostgreSQL, tests in a pod.

On the session's real control plane; the production Rollout is walked by the Argo Rollouts stand-in
(devcluster/rollouts_standin.py), since no Argo controller runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

NEVER_SEEN = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: bike-share}
spec:
  summary: Riders borrow bikes from docks.
  entities:
    - name: Dock
      fields:
        - {name: code, type: string, required: true, unique: true, min_length: 3, max_length: 8}
        - {name: slots, type: integer, minimum: 1, maximum: 40, default: 10}
    - name: Bike
      fields:
        - {name: serial, type: string, required: true, unique: true}
        - {name: dock, type: ref, to: Dock, on_delete: restrict}
  promotion: {environments: [dev, production]}
"""


def codemind(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "codemind_dagster.cli", *args], capture_output=True, text=True,
                          env=merged, cwd=cwd, timeout=900, check=False)


@pytest.mark.k8s
@pytest.mark.postgres
def test_demo_on_k8s_runs_jobs_and_serves_production_from_the_cluster(kube, fresh_pg_url, tmp_path: Path,
                                                                        monkeypatch):
    from kubernetes import client

    from codemind_dagster.instance import PG_URL_ENV, RUN_NAMESPACE, dagster_pg_url

    database = fresh_pg_url
    # As the README runs it: the default home, relative to the working directory, holds the kubeconfig.
    (tmp_path / ".codemind" / "kube").mkdir(parents=True)
    (tmp_path / ".codemind" / "kube" / "config").symlink_to(kube.kubeconfig)
    env = {"CODEMIND_PROFILE": "k8s", "CODEMIND_HOME": None, "CODEMIND_KUBECONFIG": None, "DAGSTER_HOME": None,
           "CODEMIND_DATABASE_URL": database, "CODEMIND_HEALTH_TIMEOUT_S": "60"}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bike-share.yaml").write_text(NEVER_SEEN)
    batch = client.BatchV1Api(kube.api())
    try:
        r = codemind("demo", "--intents", str(inbox), env=env, cwd=tmp_path)
        print(r.stdout[-4000:])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout.count("is a Kubernetes Job") == 3 and "deploy to production ok" in r.stdout

        # The production URL is the Rollout's pod on this machine and honours the spec's contract.
        [s] = json.loads(codemind("status", "--json", env=env, cwd=tmp_path).stdout)["intents"]
        assert s["state"] == "live" and s["tests"]["passed"] > 0 and s["tests"]["failed"] == 0
        url = s["environments"]["production"]["url"]
        assert s["environments"]["production"]["healthy"] and url.startswith("http://127.77.")
        dock = httpx.post(f"{url}/docks", json={"code": "D01"}, timeout=5)
        assert dock.status_code == 201 and dock.json()["slots"] == 10
        bike = httpx.post(f"{url}/bikes", json={"serial": "B-1", "dock": dock.json()["id"]}, timeout=5)
        assert bike.status_code == 201
        assert httpx.post(f"{url}/docks", json={"code": "x"}, timeout=5).status_code == 422
        assert httpx.delete(f"{url}/docks/{dock.json()['id']}", timeout=5).status_code == 409  # restrict

        # Each run was a Job of K8sRunLauncher, and each step of the pipeline a Job of k8s_job_executor.
        every = batch.list_namespaced_job(RUN_NAMESPACE, label_selector="dagster/run-id").items
        jobs = [j for j in every if "dagster/op" not in j.metadata.labels]
        step_jobs = {j.metadata.labels["dagster/op"]: j for j in every if "dagster/op" in j.metadata.labels}
        assert len(jobs) == 3 and all(j.status.succeeded == 1 for j in jobs)
        assert all(j.status.succeeded == 1 and j.metadata.labels["dagster/job"] == "deliver_intent"
                   for j in step_jobs.values())
        assert client.AppsV1Api(kube.api()).read_namespaced_deployment("bike-share", "codemind-dev")
        rollout = client.CustomObjectsApi(kube.api("production")).get_namespaced_custom_object(
            "argoproj.io", "v1alpha1", "codemind-production", "rollouts", "bike-share")
        assert rollout["status"]["phase"] == "Healthy"

        # The runs and their step events are in the instance on PostgreSQL; the tests ran in a sandbox pod.
        import dagster as dg

        monkeypatch.setenv(PG_URL_ENV, dagster_pg_url(database))
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / ".codemind" / "dagster"))
        instance = dg.DagsterInstance.get()
        try:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.run_launcher).__name__ == "K8sRunLauncher"
            runs = instance.get_runs()
            assert {j.metadata.labels["dagster/run-id"] for j in jobs} == {run.run_id for run in runs}
            assert all(run.is_success for run in runs)
            [pipeline] = [run for run in runs if run.job_name == "deliver_intent"]
            steps = {e.dagster_event.step_key for e in instance.all_logs(
                pipeline.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
            assert {"generated_code", "test_results", "release_candidate"} <= steps
            assert set(step_jobs) == steps  # every step of the pipeline ran in a pod of its own
            assert {j.metadata.labels["dagster/run-id"] for j in step_jobs.values()} == {pipeline.run_id}
            messages = [e.user_message for e in instance.all_logs(pipeline.run_id)]
            assert any("in pod dagster-" in m for m in messages), "no log line of the sandbox pod arrived"
        finally:
            instance.dispose()

        # A cluster that does not answer does not keep the others running; `down` says what it could not reach.
        partial = codemind("down", env={**env, "CODEMIND_K8S_CONTEXTS": '{"dr": "nowhere"}'}, cwd=tmp_path)
        assert partial.returncode == 1 and "Traceback" not in partial.stderr
        assert "stopped 2 workload(s)" in partial.stderr and "'nowhere'" in partial.stderr
        assert not client.AppsV1Api(kube.api()).list_namespaced_deployment(
            "codemind-dev", label_selector="app.kubernetes.io/name=bike-share").items
    finally:
        down = codemind("down", env=env, cwd=tmp_path)
        print(down.stdout, down.stderr)
        batch.delete_collection_namespaced_job(RUN_NAMESPACE, propagation_policy="Background")
