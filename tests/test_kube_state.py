"""infrastructure_state on clusters: pod-based drift rules, hand edits found by KubeRuntime, the cluster inventory.

The cluster tests (marked k8s) run on the `kube` fixture's real control planes (see tests/test_kube_runtime.py);
production's Rollout is driven by devcluster/rollouts_standin.py, which stands in for the Argo Rollouts
controller. Each test maps the environments onto namespaces of its own, so no other test's releases show up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codemind_dagster.domain.drift import DRIFT_KINDS, ObservedService, compute_drift
from codemind_dagster.resources.clusters import ARTIFACT_ANNOTATION, ClusterMap
from codemind_dagster.resources.runtime import RuntimeStatus

REPO = Path(__file__).resolve().parents[1]
INTENT = REPO / "examples" / "intents" / "loyalty-points.yaml"
A, B = "a" * 64, "b" * 64
NAMESPACES = {"dev": "codemind-state-dev", "staging": "codemind-state-staging",
              "production": "codemind-state-prod", "dr": "codemind-state-dr"}
ROLLOUTS = ("argoproj.io", "v1alpha1")


def pods(intent="shop", env="dev", artifact=A, ready=1, healthy=True, findings=()) -> ObservedService:
    return ObservedService(intent=intent, environment=env, artifact=artifact, pid=None, healthy=healthy,
                           port=8080, pods_ready=ready, findings=tuple(findings))


def _kinds(doc) -> dict[tuple[str, str], str]:
    return {(d["intent"], d["environment"]): d["kind"] for d in doc["drift"]}


def _detail(doc, intent: str, env: str) -> str:
    return next(d["detail"] for d in doc["drift"] if (d["intent"], d["environment"]) == (intent, env))


# ============================================================================ pure: drift rules for pods


def test_ready_pods_count_as_running_and_match_the_record():
    assert pods().running and not pods(ready=0).running
    assert compute_drift({("shop", "dev"): A}, [pods(ready=2)]) == []


def test_runtime_status_defaults_keep_process_services_as_they_were():
    st = RuntimeStatus(service="shop", environment="dev", url="http://x", port=1, artifact=A, pid=7, healthy=True,
                       uptime_s=1.0, memory_rss_bytes=1, proxy_pid=None, started_at="now")
    svc = ObservedService.from_status(st)
    assert (svc.pods_ready, svc.findings, svc.running) == (None, (), True)
    assert svc.as_dict()["findings"] == [] and svc.as_dict()["running"] is True
    k8s = ObservedService.from_status(RuntimeStatus(**{**st.__dict__, "pid": None, "pods_ready": 3,
                                                       "findings": ("edited",)}))
    assert k8s.running and k8s.findings == ("edited",)


def test_a_hand_edit_of_a_healthy_service_is_modified_drift():
    [d] = compute_drift({("shop", "dev"): A}, [pods(findings=["image changed", "annotation changed"])])
    assert d.kind == "modified" and "modified" in DRIFT_KINDS
    assert "aaaaaaaaaaaa runs as recorded" in d.detail
    assert d.detail.endswith("; image changed; annotation changed")


def test_scaled_to_zero_is_missing_and_says_why():
    [d] = compute_drift({("shop", "dev"): A}, [pods(ready=0, healthy=False, findings=["scaled to 0"])])
    assert d.kind == "missing"
    assert "no pod of it is ready" in d.detail and d.detail.endswith("; scaled to 0")


def test_other_kinds_take_precedence_and_carry_the_findings():
    [d] = compute_drift({("shop", "dev"): A}, [pods(artifact=B, findings=["template edited"])])
    assert d.kind == "wrong_artifact" and "bbbbbbbbbbbb (1 ready pod(s))" in d.detail
    assert d.detail.endswith("; template edited")
    [d] = compute_drift({("shop", "dev"): A}, [pods(ready=2, healthy=False)])
    assert d.kind == "unhealthy" and d.detail.startswith("2 ready pod(s) run aaaaaaaaaaaa on port 8080")
    [d] = compute_drift({}, [pods(env="staging")])
    assert d.kind == "unexpected" and d.detail.startswith("1 ready pod(s) run aaaaaaaaaaaa")
    # Known to the cluster but scaled away, and wanted by nobody: nothing to report.
    assert compute_drift({}, [pods(ready=0, findings=["scaled to 0"])]) == []


def test_records_of_an_unreachable_environment_are_unobserved_not_missing():
    unreachable = {"production": "cannot reach context 'production'"}
    drift = compute_drift({("shop", "dev"): A, ("shop", "production"): A}, [pods()], unreachable)
    [d] = drift
    assert (d.environment, d.kind) == ("production", "unobserved")
    assert d.detail == "records say aaaaaaaaaaaa is live; cannot check: cannot reach context 'production'"
    assert compute_drift({}, [], unreachable) == []


def test_unreachable_contexts_are_error_entries_and_unobserved_drift(tmp_path: Path):
    from codemind_dagster.assets.platform import clusters_markdown, collect_state
    from codemind_dagster.resources.database import PlatformDB
    from codemind_dagster.resources.kube_runtime import KubeRuntime, KubeUnreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = tmp_path / "config"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev-staging",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "dev-staging", "context": {"cluster": "gone", "user": "u"}}],
    }))
    rt = KubeRuntime(ClusterMap(kubeconfig=kc, contexts={"dev": "dev-staging", "production": "production"},
                                namespaces={"dev": "ns-dev", "production": "ns-prod"}))
    started = time.monotonic()
    dev, prod = rt.inventory()
    assert time.monotonic() - started < 10
    assert (dev["context"], dev["reachable"], dev["namespaces"]) == ("dev-staging", False, ["ns-dev"])
    assert "cannot reach" in dev["error"] and f":{port}" in dev["error"]
    assert (prod["context"], prod["reachable"]) == ("production", False)
    assert "no usable context 'production'" in prod["error"]

    with pytest.raises(KubeUnreachable):
        rt.list()  # deploy paths still fail loudly; only the state document degrades
    db = PlatformDB(f"sqlite:///{tmp_path / 'platform.db'}")
    db.migrate()
    db.finish_deployment(db.start_deployment("shop", "production", A, None), "live")
    doc = collect_state(db, rt, None)
    assert [(d["environment"], d["kind"]) for d in doc["drift"]] == [("production", "unobserved")]
    assert "no usable context 'production'" in doc["drift"][0]["detail"]
    envs = {e["name"]: e for e in doc["environments"]}
    assert "cannot reach" in envs["dev"]["unobserved"] and "unobserved" not in envs["staging"]
    assert [c["reachable"] for c in doc["clusters"]] == [False, False]
    assert "| dev-staging | False |" in clusters_markdown(doc["clusters"])


# ============================================================================ on the real control planes


def bundle(store) -> tuple[str, Path]:
    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.domain.intent import parse_intent_text

    artifact = store.put_bundle(render_service(parse_intent_text(INTENT.read_text(), INTENT.name)))
    return artifact, store.bundle_dir(artifact)


@pytest.fixture
def store(tmp_path: Path):
    from codemind_dagster.resources.artifacts import LocalArtifactStore

    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def rt(kube):
    """A KubeRuntime on this module's own namespaces; stops every release a test made, even a half-deleted one."""
    from codemind_dagster.resources.kube_runtime import KubeRuntime

    runtime = KubeRuntime(ClusterMap(kubeconfig=kube.kubeconfig,
                                     contexts={"dev": "dev-staging", "production": "production"},
                                     namespaces={"dev": NAMESPACES["dev"], "production": NAMESPACES["production"]}),
                          health_timeout_s=60, stop_grace_s=20)
    made: list[tuple[str, str]] = []
    runtime.made = made  # type: ignore[attr-defined]
    yield runtime
    for service, env in made:
        runtime.stop(service, env)  # by selector, so Services and ConfigMaps of a deleted Rollout go too
    assert runtime.list() == []
    for c in runtime.inventory():
        assert not c["deployments"] and not c["rollouts"] and not [p for p in c["pods"] if not p["terminating"]]


def deploy_and_record(rt, db, service: str, env: str, art: tuple[str, Path]) -> None:
    rt.made.append((service, env))
    t0 = time.monotonic()
    out = rt.deploy(service=service, environment=env, artifact=art[0], bundle_dir=art[1])
    print(f"[timing] deploy {service}/{env}: {out.outcome} in {time.monotonic() - t0:.1f}s")
    assert out.ok, out.reason
    dep = db.start_deployment(service, env, art[0], None)
    db.finish_deployment(dep, "live", url=out.url)


def clients(kube, context: str):
    from kubernetes import client

    c = kube.api(context)
    return client.AppsV1Api(c), client.CoreV1Api(c), client.CustomObjectsApi(c)


def wait_for(what, check, timeout_s: float = 40.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.k8s
def test_state_of_dev_and_production_sees_hand_edits_scaling_and_deletion(kube, rt, store, tmp_path, capsys):
    from codemind_dagster.assets.platform import clusters_markdown, collect_state
    from codemind_dagster.commands.state import print_state
    from codemind_dagster.resources.database import PlatformDB

    svc, dev_ns, prod_ns = "state-shop", NAMESPACES["dev"], NAMESPACES["production"]
    db = PlatformDB(f"sqlite:///{tmp_path / 'platform.db'}")
    db.migrate()
    art = bundle(store)
    for env in ("dev", "production"):
        deploy_and_record(rt, db, svc, env, art)

    t0 = time.monotonic()
    doc = collect_state(db, rt, None)
    print(f"[timing] collect_state with inventory: {time.monotonic() - t0:.2f}s")
    assert doc["drift"] == [], doc["drift"]
    by_env = {s["environment"]: s for s in doc["services"] if s["intent"] == svc}
    for env in ("dev", "production"):
        s = by_env[env]
        assert s["running"] and s["healthy"] and s["pods_ready"] == 1 and s["pid"] is None
        assert s["findings"] == [] and s["artifact"] == s["desired_artifact"] == art[0]
    assert {e["name"]: e["running"] for e in doc["environments"]}["production"] == 1

    # The inventory: every configured context, its nodes and the workloads of the mapped namespaces.
    clusters = {c["context"]: c for c in doc["clusters"]}
    assert set(clusters) == {"dev-staging", "production"}
    for c in clusters.values():
        assert c["reachable"] and c["error"] is None and c["server"].startswith("https://")
        assert c["nodes"] and all(n["ready"] and n["kubelet_version"] for n in c["nodes"])
    dev, prod = clusters["dev-staging"], clusters["production"]
    assert dev["namespaces"] == [dev_ns] and prod["namespaces"] == [prod_ns]
    [d] = [d for d in dev["deployments"] if d["name"] == svc]
    assert (d["artifact"], d["replicas"], d["ready_replicas"], d["available"], d["revision"]) == (art[0], 1, 1, True, 1)
    [rs] = [r for r in dev["replicasets"] if r["owner"] == f"Deployment/{svc}"]
    assert (rs["revision"], rs["replicas"], rs["ready_replicas"], rs["artifact"]) == (1, 1, 1, art[0])
    [ro] = [r for r in prod["rollouts"] if r["name"] == svc]
    assert ro["phase"] == "Healthy" and ro["stable_revision"] == 1 and ro["canary_weight"] == 0
    assert ro["stable_hash"] == ro["current_hash"] and not ro["aborted"]
    [prs] = [r for r in prod["replicasets"] if r["owner"] == f"Rollout/{svc}"]
    assert (prs["revision"], prs["replicas"], prs["ready_replicas"]) == (1, 1, 1)
    for c, rs_name in ((dev, rs["name"]), (prod, prs["name"])):
        [p] = [p for p in c["pods"] if p["owner"] == f"ReplicaSet/{rs_name}"]
        assert (p["phase"], p["ready"], p["restarts"], p["terminating"]) == ("Running", True, 0, False)
        assert p["node"] and p["pod_ip"] and p["artifact"] == art[0]
    md = clusters_markdown(doc["clusters"])
    assert "| dev-staging | True |" in md and f"| Rollout | {prod_ns} | {svc} |" in md and "Healthy" in md
    print_state(doc)
    printed = capsys.readouterr().out
    assert "Clusters" in printed and "Workloads" in printed and "Pods" in printed and "1 ready pod(s)" in printed

    apps, core, _ = clients(kube, "dev-staging")
    _, _, crd = clients(kube, "production")
    # By hand, as `kubectl set image` and `kubectl annotate` would: dev's image and its bundle ConfigMap.
    apps.patch_namespaced_deployment(
        svc, dev_ns, {"spec": {"template": {"spec": {"containers": [
            {"name": "service", "image": "codemind/service-runtime:hotfix"}]}}}},
        field_manager="kubectl-set", _content_type="application/strategic-merge-patch+json")
    cm = f"{svc}-{art[0][:12]}"
    core.patch_namespaced_config_map(cm, dev_ns, {"metadata": {"annotations": {ARTIFACT_ANNOTATION: B}}},
                                     field_manager="kubectl-annotate",
                                     _content_type="application/merge-patch+json")
    # ... and production's artifact annotation on the Rollout itself.
    crd.patch_namespaced_custom_object(*ROLLOUTS, prod_ns, "rollouts", svc,
                                       {"metadata": {"annotations": {ARTIFACT_ANNOTATION: B}}},
                                       field_manager="kubectl-annotate",
                                       _content_type="application/merge-patch+json")
    doc = collect_state(db, rt, None)
    assert _kinds(doc) == {(svc, "dev"): "modified", (svc, "production"): "modified"}, doc["drift"]
    dev_detail = _detail(doc, svc, "dev")
    assert "runs image codemind/service-runtime:hotfix (set by 'kubectl-set')" in dev_detail
    assert "the platform applies codemind/service-runtime:py3.11" in dev_detail
    assert f"ConfigMap {dev_ns}/{cm}: annotation {ARTIFACT_ANNOTATION} says {B[:12]} (set by 'kubectl-annotate')" \
        in dev_detail
    assert f"annotation {ARTIFACT_ANNOTATION} says {B[:12]} (set by 'kubectl-annotate') but its pod template runs " \
        f"{art[0][:12]}" in _detail(doc, svc, "production")

    # `kubectl scale --replicas=0` on dev: drift once its pods are gone (the scale subresource records no manager).
    apps.patch_namespaced_deployment_scale(svc, dev_ns, {"spec": {"replicas": 0}}, field_manager="kubectl-scale")
    t0 = time.monotonic()

    def dev_missing():
        d = collect_state(db, rt, None)
        return d if _kinds(d).get((svc, "dev")) == "missing" else None

    doc = wait_for("dev to show as missing", dev_missing)
    print(f"[timing] scaled to 0 -> missing drift after {time.monotonic() - t0:.1f}s")
    dev_detail = _detail(doc, svc, "dev")
    assert "no pod of it is ready" in dev_detail
    assert f"Deployment {dev_ns}/{svc} is scaled to 0 replica(s) (changed outside the platform: field manager " \
        "'codemind' no longer owns it); the platform applies 1" in dev_detail
    [s] = [s for s in doc["services"] if (s["intent"], s["environment"]) == (svc, "dev")]
    assert s["pods_ready"] == 0 and not s["running"]

    # `kubectl delete rollout` in production: the release is simply absent, so its record is missing drift.
    crd.delete_namespaced_custom_object(*ROLLOUTS, prod_ns, "rollouts", svc)
    doc = collect_state(db, rt, None)
    assert _kinds(doc)[(svc, "production")] == "missing"
    assert "the runtime reports no such service" in _detail(doc, svc, "production")
    assert not [s for s in doc["services"] if s["environment"] == "production"]
    prod = next(c for c in doc["clusters"] if c["context"] == "production")
    assert prod["rollouts"] == []


@pytest.mark.k8s
@pytest.mark.postgres
def test_state_cli_on_the_k8s_profile_shows_a_deleted_production_rollout(kube, rt, store, fresh_pg_url,
                                                                          codemind_home):
    from codemind_dagster.resources.database import PlatformDB

    svc = "state-cli"
    db = PlatformDB(fresh_pg_url)
    db.migrate()
    deploy_and_record(rt, db, svc, "production", bundle(store))
    _, _, crd = clients(kube, "production")
    crd.delete_namespaced_custom_object(*ROLLOUTS, NAMESPACES["production"], "rollouts", svc)

    env = {**os.environ, "CODEMIND_PROFILE": "k8s", "CODEMIND_HOME": str(codemind_home),
           "CODEMIND_KUBECONFIG": str(kube.kubeconfig), "CODEMIND_DATABASE_URL": fresh_pg_url,
           "CODEMIND_K8S_NAMESPACES": json.dumps(NAMESPACES)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "codemind_dagster.cli", "state", "--json"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)
    print(f"[timing] codemind state --json (k8s profile): {time.monotonic() - t0:.1f}s")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    [d] = [d for d in doc["drift"] if d["intent"] == svc]
    assert (d["environment"], d["kind"]) == ("production", "missing")
    assert "the runtime reports no such service" in d["detail"]
    clusters = {c["context"]: c for c in doc["clusters"]}
    assert set(clusters) == {"dev-staging", "production", "dr"}
    assert all(c["reachable"] and c["nodes"] for c in clusters.values())
    assert clusters["production"]["namespaces"] == [NAMESPACES["production"]]
    assert clusters["dev-staging"]["namespaces"] == sorted([NAMESPACES["dev"], NAMESPACES["staging"]])
