"""DR drill of the k8s profile on the real local control planes: restore, redeploy into the dr cluster, probe, teardown.

The `kube` fixture runs two real clusters (main: dev-staging and production; dr: its own apiserver and node whose pods
get 127.78.x.y). The Velero CRDs are installed in both, but no Velero controller runs here: the drill creates the
Backup and Restore objects, and its Velero checks say that no controller answered and leave the verdict to the
redeploys. PostgreSQL at 127.0.0.1:5432 holds the platform DB, as in the k8s profile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import pytest
import sqlalchemy as sa

pytestmark = [pytest.mark.k8s, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
INTENT = REPO / "examples" / "intents" / "loyalty-points.yaml"
DR_NS = "codemind-production"
SERVICE_LABEL = "app.kubernetes.io/name"

# Appended to the generated app.py: which build answered, so the test can tell releases apart over HTTP.
TAG_ROUTE = '''

@app.get("/release-tag")
def _release_tag():
    return {"tag": "{tag}"}
'''
# Crashes at import, before uvicorn can listen: the pod's container exits non-zero.
CRASH = '''
raise RuntimeError("boom: {tag} cannot start")
'''


def intent_named(name: str):
    from codemind_dagster.domain.intent import parse_intent_text

    text = INTENT.read_text().replace("name: loyalty-points", f"name: {name}", 1)
    return parse_intent_text(text, f"{name}.yaml")


def put_release(db, artifacts_root: Path, name: str, tag: str, extra: str = "", env: str = "production") -> str:
    """A real bundle in the artifact store and the rows the pipeline leaves for a live release of it."""
    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.resources.artifacts import LocalArtifactStore

    intent = intent_named(name)
    files = render_service(intent)
    files["service/app.py"] += (TAG_ROUTE + extra).replace("{tag}", tag)
    artifact = LocalArtifactStore(artifacts_root).put_bundle(files)
    db.upsert_intent(name, intent.content_hash, intent.canonical(), f"{name}.yaml")
    db.add_release(name, artifact, intent.content_hash, "run-release")
    dep = db.start_deployment(name, env, artifact, "run-deploy")
    db.finish_deployment(dep, "live", url=f"http://127.77.0.9:8080/{name}", pid=None)
    return artifact


@pytest.fixture
def platform(fresh_pg_url, tmp_path: Path):
    from codemind_dagster.resources.database import PlatformDB

    db = PlatformDB(fresh_pg_url)
    db.migrate()
    return db


@pytest.fixture
def resources(kube, platform, tmp_path: Path):
    """The k8s profile's backups resource over the session's clusters; removes what a failing drill leaves."""
    from codemind_dagster.resources.kube_dr import KubeBackupStoreResource
    from codemind_dagster.resources.platform import DatabaseResource

    database = DatabaseResource(url=platform.url)
    backups = KubeBackupStoreResource(
        database=database, root=str(tmp_path / "backups"), artifacts_root=str(tmp_path / "artifacts"),
        scratch_root=str(tmp_path / "scratch"), kubeconfig_path=str(kube.kubeconfig), health_timeout_s=60,
        velero_wait_s=2.0)
    yield {"database": database, "backups": backups}
    leftover(kube)


def leftover(kube) -> None:
    """Test cleanup only: dr releases and this test's Velero objects (the product has no delete right on them)."""
    from kubernetes import client

    from codemind_dagster.resources.clusters import ClusterMap
    from codemind_dagster.resources.kube_runtime import KubeRuntime

    rt = KubeRuntime(ClusterMap.parse(kube.kubeconfig), stop_grace_s=20)
    for s in rt.list():
        if s.environment == "dr":
            rt.stop(s.service, "dr")
    for ctx, plural in (("production", "backups"), ("dr", "restores")):
        crd = client.CustomObjectsApi(kube.api(ctx))
        for obj in crd.list_namespaced_custom_object("velero.io", "v1", "velero", plural)["items"]:
            crd.delete_namespaced_custom_object("velero.io", "v1", "velero", plural, obj["metadata"]["name"])


class DrWatcher:
    """Watches the dr cluster's pods during the drill and asks each one, once Ready, which build it runs."""

    def __init__(self, kube):
        from kubernetes import client

        self.core = client.CoreV1Api(kube.api("dr"))
        self.seen: dict[str, tuple[str, str, dict]] = {}  # service -> (pod IP, tag, /healthz body)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._asks: list[threading.Thread] = []

    def _ask(self, svc: str, ip: str) -> None:
        for _ in range(20):
            try:
                health = httpx.get(f"http://{ip}:8080/healthz", timeout=2).json()
                tag = httpx.get(f"http://{ip}:8080/release-tag", timeout=2).json()["tag"]
                self.seen[svc] = (ip, tag, health)
                return
            except httpx.HTTPError:
                time.sleep(0.05)

    def _run(self) -> None:
        from kubernetes import watch

        asked: set[str] = set()
        while not self._stop.is_set():
            # A watch, not polling: the drill tears the pods down a moment after its own probes.
            for ev in watch.Watch().stream(self.core.list_namespaced_pod, DR_NS, timeout_seconds=1):
                pod = ev["object"]
                ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
                svc = (pod.metadata.labels or {}).get(SERVICE_LABEL)
                if ready and pod.status.pod_ip and pod.metadata.name not in asked:
                    asked.add(pod.metadata.name)
                    th = threading.Thread(target=self._ask, args=(svc, pod.status.pod_ip), daemon=True)
                    th.start()
                    self._asks.append(th)
                if self._stop.is_set():
                    break

    def __enter__(self) -> Self:
        self._thread.start()
        time.sleep(0.3)  # the watch is open before the drill starts
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for th in self._asks:
            th.join(5)


def dr_namespace_objects(kube) -> dict[str, list[str]]:
    from kubernetes import client

    core, apps = client.CoreV1Api(kube.api("dr")), client.AppsV1Api(kube.api("dr"))
    return {"pods": [p.metadata.name for p in core.list_namespaced_pod(DR_NS).items],
            "deployments": [d.metadata.name for d in apps.list_namespaced_deployment(DR_NS).items],
            "services": [s.metadata.name for s in core.list_namespaced_service(DR_NS).items],
            "configmaps": [c.metadata.name for c in core.list_namespaced_config_map(
                DR_NS, label_selector="app.kubernetes.io/managed-by=codemind").items]}


def checks_of(result) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in result.checks}


def test_drill_redeploys_every_live_production_release_into_dr_probes_and_tears_down(kube, platform, resources,
                                                                                   tmp_path: Path):
    """Two live production releases are redeployed from the restored backup into the dr cluster and serve there.

    No Velero controller runs here: the Backup and Restore objects are created and pass the real CRD schemas, and
    their checks report "no Velero controller answered; phase empty" without failing the drill."""
    from kubernetes import client

    from codemind_dagster.domain.dr import CHECK_NAMES
    from codemind_dagster.resources import tables as t

    artifacts = tmp_path / "artifacts"
    old = put_release(platform, artifacts, "loyalty-points", "lp-old")
    lp = put_release(platform, artifacts, "loyalty-points", "lp-live")  # supersedes lp-old in production
    rw = put_release(platform, artifacts, "rewards-desk", "rw-live")
    put_release(platform, artifacts, "dev-only", "dev-live", env="dev")  # not in production: not redeployed
    store = resources["backups"].store()
    manifest = store.create()
    # After the backup: DR must bring back what the backup recorded, not what the live DB says now.
    put_release(platform, artifacts, "after-backup", "late")

    t0 = time.monotonic()
    with DrWatcher(kube) as watch:
        result = store.drill(manifest.id)
    took = time.monotonic() - t0
    print(f"[timing] k8s drill with 2 releases: {took:.1f}s, RTO {result.rto_s:.1f}s")
    for c in result.checks:
        print(f"    {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail[:300]}")
    assert result.ok, result.failure
    checks = checks_of(result)
    names = [c.name for c in result.checks]
    assert names[:len(CHECK_NAMES)] == list(CHECK_NAMES)  # the local restore + verify, unchanged, first
    assert set(names[len(CHECK_NAMES):]) == {
        "dr_releases", "dr_deploy:loyalty-points", "dr_contract:loyalty-points", "dr_deploy:rewards-desk",
        "dr_contract:rewards-desk", "dr_teardown", "velero_backup", "velero_restore"}
    assert "2 live production release(s)" in checks["dr_releases"][1] and old[:12] not in checks["dr_releases"][1]
    assert rw[:12] in checks["dr_deploy:rewards-desk"][1]
    assert lp[:12] in checks["dr_deploy:loyalty-points"][1] and "restored artifact data" in \
        checks["dr_deploy:loyalty-points"][1] and "context 'dr'" in checks["dr_deploy:loyalty-points"][1]
    contract = checks["dr_contract:loyalty-points"][1]
    assert "GET /healthz ok" in contract and "GET /customers 200" in contract and "GET /rewards 200" in contract

    # Served in the dr cluster (pod IPs 127.78.x.y) during the drill, each the build the backup recorded.
    assert set(watch.seen) == {"loyalty-points", "rewards-desk"}, watch.seen
    assert watch.seen["loyalty-points"][1:] == ("lp-live", {"status": "ok"})
    assert watch.seen["rewards-desk"][1:] == ("rw-live", {"status": "ok"})
    assert all(ip.startswith("127.78.") for ip, _, _ in watch.seen.values())
    assert store.last_probes["rewards-desk"][0]["path"] == "/healthz"
    assert all(a["ok"] for a in store.last_probes["rewards-desk"])

    # Velero objects: a Backup of the production namespace in production, a Restore of it in dr; no phase.
    assert checks["velero_backup"][0] and "no Velero controller answered" in checks["velero_backup"][1]
    assert "phase empty" in checks["velero_restore"][1] and "does not fail the drill" in checks["velero_restore"][1]
    [backup] = client.CustomObjectsApi(kube.api("production")).list_namespaced_custom_object(
        "velero.io", "v1", "velero", "backups")["items"]
    assert backup["spec"]["includedNamespaces"] == ["codemind-production"]
    assert backup["metadata"]["annotations"]["codemind.dev/backup"] == manifest.id
    assert not (backup.get("status") or {}).get("phase")
    [restore] = client.CustomObjectsApi(kube.api("dr")).list_namespaced_custom_object(
        "velero.io", "v1", "velero", "restores")["items"]
    assert restore["spec"]["backupName"] == backup["metadata"]["name"]
    assert restore["spec"]["includedNamespaces"] == ["codemind-production"]

    # Torn down: nothing of the platform runs in dr, and no stray service shows in the runtime's state.
    assert dr_namespace_objects(kube) == {"pods": [], "deployments": [], "services": [], "configmaps": []}
    assert "removed 2 release(s)" in checks["dr_teardown"][1]
    assert not [s for s in store.runtime.list() if s.environment == "dr"]

    # Recorded: RPO from the backup's data time, RTO covering restore + redeploys + probes.
    with platform.engine.connect() as c:
        row = c.execute(sa.select(t.dr_drills).where(t.dr_drills.c.id == result.id)).one()
    assert row.ok and row.rpo_s == pytest.approx(result.rpo_s) and row.rpo_s > 0
    assert {ch["name"] for ch in row.checks} >= {"dr_deploy:loyalty-points", "dr_contract:rewards-desk"}
    assert 1.0 < result.rto_s < took
    assert platform.last_successful_drill_at() is not None


def test_a_release_whose_bundle_does_not_start_fails_the_drill_naming_it(kube, platform, resources, tmp_path: Path):
    """The dr_validation asset fails with the release named; the failed drill is recorded and dr is left empty."""
    import dagster as dg

    from codemind_dagster.assets.dr import BACKUP_TAG, dr_validation
    from codemind_dagster.resources.backups import drill_history

    put_release(platform, tmp_path / "artifacts", "broken-desk", "v1", CRASH)
    store = resources["backups"].store()
    manifest = store.create()
    instance = dg.DagsterInstance.ephemeral()
    t0 = time.monotonic()
    try:
        run = dg.materialize([dr_validation], instance=instance, resources=resources, raise_on_error=False,
                             tags={BACKUP_TAG: manifest.id})
    finally:
        instance.dispose()
    print(f"[timing] drill with a crashing release: {time.monotonic() - t0:.1f}s")
    assert not run.success
    [event] = [e for e in run.all_events if e.is_step_failure]
    message = event.step_failure_data.user_failure_data.description
    print(message[:1500])
    assert message.startswith(f"DR drill of {manifest.id} failed: dr_deploy:broken-desk: broken-desk ")
    assert "did not come up in namespace codemind-production of context 'dr'" in message
    assert "boom: v1 cannot start" in message  # the pod's log, from the dr cluster
    [drill] = drill_history(platform, 5)
    assert not drill["ok"] and drill["detail"].startswith("dr_deploy:broken-desk")
    by_name = {c["name"]: c for c in drill["checks"]}
    assert by_name["dr_contract:broken-desk"] == {"name": "dr_contract:broken-desk", "ok": False,
                                                  "detail": "not run: broken-desk was not redeployed"}
    assert by_name["artifact_checksums"]["ok"]  # the bundle itself is intact: it is the release that is broken
    assert dr_namespace_objects(kube) == {"pods": [], "deployments": [], "services": [], "configmaps": []}
    assert platform.last_successful_drill_at() is None


def test_cli_dr_validate_json_on_the_k8s_profile(kube, fresh_pg_url, tmp_path: Path):
    """`codemind backup` then `codemind dr validate --json` on the k8s profile: the drill runs as a K8sRunLauncher Job."""
    from kubernetes import client

    from codemind_dagster.instance import RUN_NAMESPACE
    from codemind_dagster.resources.database import PlatformDB

    home = tmp_path / "home"
    db = PlatformDB(fresh_pg_url)
    db.migrate()
    art = put_release(db, home / "artifacts", "loyalty-points", "cli")
    env = {**os.environ, "CODEMIND_PROFILE": "k8s", "CODEMIND_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "CODEMIND_KUBECONFIG": str(kube.kubeconfig), "CODEMIND_DATABASE_URL": fresh_pg_url,
           "CODEMIND_HEALTH_TIMEOUT_S": "60"}
    env.pop("DAGSTER_PG_URL", None)

    batch = client.BatchV1Api(kube.api())

    def codemind(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "codemind_dagster.cli", *args], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=600, check=False)

    try:
        made = codemind("backup")
        assert made.returncode == 0, made.stderr[-3000:]
        backup_id = made.stdout.split()[0]
        t0 = time.monotonic()
        r = codemind("dr", "validate", "--json")
        print(f"[timing] codemind dr validate --json (k8s): {time.monotonic() - t0:.1f}s")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        doc = json.loads(r.stdout)
        print(json.dumps(doc, indent=1)[:3000])
        assert "dr_drill: run " in r.stderr and "is a Kubernetes Job" in r.stderr
        # The run is over in the instance a moment before its pod exits and the Job controller counts it.
        for job_name in ("backup_platform", "dr_drill"):
            deadline = time.monotonic() + 60
            while True:
                [job] = batch.list_namespaced_job(RUN_NAMESPACE, label_selector=f"dagster/job={job_name}").items
                if job.status.succeeded == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert job.status.succeeded == 1, job.status
    finally:
        leftover(kube)
        batch.delete_collection_namespaced_job(RUN_NAMESPACE, label_selector="dagster/job in (backup_platform,dr_drill)",
                                               propagation_policy="Background")
    assert doc["backup"] == backup_id and doc["ok"] is True and doc["rpo_s"] > 0 and doc["rto_s"] > 0
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["dr_deploy:loyalty-points"]["ok"] and art[:12] in checks["dr_deploy:loyalty-points"]["detail"]
    assert checks["dr_contract:loyalty-points"]["ok"] and "/healthz" in checks["dr_contract:loyalty-points"]["detail"]
    assert "no Velero controller answered" in checks["velero_backup"]["detail"]
    assert checks["dr_teardown"]["ok"]
    assert dr_namespace_objects(kube) == {"pods": [], "deployments": [], "services": [], "configmaps": []}
