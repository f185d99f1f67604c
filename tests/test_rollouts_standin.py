"""Tests of devcluster/rollouts_standin.py, the test stand-in that replaces the Argo Rollouts controller here.

The pure planner is checked without a cluster; the k8s tests run it for real: the real ReplicaSet controller and
the node agent run its pods (a tiny HTTP server with a real readiness probe), the real CRD schemas validate every
status and VirtualService it writes.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from devcluster import rollouts_standin as rs
from devcluster.rollouts_standin import SpecError, canary_replicas, parse_duration, plan, pod_template_hash

REPO = Path(__file__).resolve().parents[1]

# ---- pure parts, no cluster ------------------------------------------------------------------------------


def template(version: str) -> dict:
    """A pod template running a tiny HTTP server on the pod's own IP, Ready when it answers /healthz."""
    server = textwrap.dedent("""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(os.environ["VERSION"].encode())
            def log_message(self, *args):
                pass
        http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
    """)
    return {
        "metadata": {"labels": {"app": "web"}, "annotations": {"test/version": version}},
        "spec": {"containers": [{
            "name": "web", "image": "codemind/test:1", "command": ["python", "-c", server],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "VERSION", "value": version}],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
        }], "terminationGracePeriodSeconds": 1},
    }


def rollout(steps: list[dict], replicas: int = 1, version: str = "v1") -> dict:
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "web", "namespace": "t", "generation": 1, "uid": "u1"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "template": template(version),
                 "strategy": {"canary": {"stableService": "web-stable", "canaryService": "web-canary", "steps": steps,
                                         "trafficRouting": {"istio": {"virtualService": {
                                             "name": "web", "routes": ["primary"]}}}}}},
    }


class Sim:
    """The planner against make-believe ReplicaSets whose pods are available as soon as they are asked for."""

    def __init__(self, ro: dict):
        self.ro, self.rss, self.now = ro, {}, 1_000_000.0

    def step(self, ready: bool = True) -> rs.Plan:
        p = plan(self.ro, self.rss, self.now)
        self.ro["status"] = p.status
        for h in set(self.rss) | set(p.replicas):
            n = p.replicas.get(h, 0)
            old = self.rss.get(h, {})
            self.rss[h] = {"replicas": n, "ready": n if ready else old.get("ready", 0),
                           "available": n if ready else old.get("available", 0),
                           "revision": old.get("revision") or len(self.rss) + 1}
        return p

    def until(self, cond: Callable[[rs.Plan], bool], limit: int = 20, **kw) -> rs.Plan:
        for _ in range(limit):
            p = self.step(**kw)
            if cond(p):
                return p
        raise AssertionError(f"not reached; status {json.dumps(self.ro['status'], indent=1)}")

    def set_template(self, version: str) -> None:
        self.ro["spec"]["template"] = template(version)
        self.ro["metadata"]["generation"] += 1


def test_hash_is_stable_label_safe_and_follows_the_template():
    a, b = template("v1"), template("v1")
    b["metadata"] = dict(reversed(list(b["metadata"].items())))  # key order does not matter
    assert pod_template_hash(a) == pod_template_hash(b)
    assert pod_template_hash(a) != pod_template_hash(template("v2"))
    h = pod_template_hash(a)
    assert 1 <= len(h) <= 10 and set(h) <= set("bcdfghjklmnpqrstvwxz2456789")


@pytest.mark.parametrize(("replicas", "weight", "want"), [(3, 20, 1), (3, 60, 2), (10, 25, 3), (3, 100, 3),
                                                          (1, 1, 1), (4, 0, 0)])
def test_canary_replicas(replicas, weight, want):
    assert canary_replicas(replicas, weight) == want


def test_pause_durations():
    assert [parse_duration(v) for v in ("5s", "1m", "1h", 7, "10", None)] == [5, 60, 3600, 7, 10, None]
    with pytest.raises(SpecError):
        parse_duration("soon")


def test_weights_go_to_the_named_routes_only():
    spec = {"http": [
        {"name": "primary", "route": [{"destination": {"host": "web-stable"}, "weight": 100},
                                      {"destination": {"host": "web-canary.t.svc.cluster.local"}, "weight": 0}]},
        {"name": "other", "route": [{"destination": {"host": "web-stable"}, "weight": 100}]}]}
    assert rs.set_vs_weights(spec, ["primary"], "web-stable", "web-canary", 30)
    assert [d["weight"] for d in spec["http"][0]["route"]] == [70, 30]
    assert spec["http"][1]["route"][0]["weight"] == 100
    assert not rs.set_vs_weights(spec, ["primary"], "web-stable", "web-canary", 30)
    with pytest.raises(SpecError, match="HTTP Route 'nope' is not found"):
        rs.set_vs_weights(spec, ["nope"], "web-stable", "web-canary", 30)


def test_plan_walks_the_canary_steps():
    """First revision straight to Healthy; then setWeight 20 -> pause 2s -> setWeight 60 -> promoted."""
    sim = Sim(rollout([{"setWeight": 20}, {"pause": {"duration": "2s"}}, {"setWeight": 60}], replicas=3))
    p = sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    h1 = pod_template_hash(template("v1"))
    st = sim.ro["status"]
    assert (st["stableRS"], st["currentPodHash"], st["currentStepIndex"], p.weight) == (h1, h1, 3, 0)
    assert st["observedGeneration"] == "1" and st["availableReplicas"] == 3

    sim.set_template("v2")
    h2 = pod_template_hash(template("v2"))
    p = sim.step(ready=False)  # the canary pod is not available yet: no traffic for it
    assert (p.replicas, p.weight, sim.ro["status"]["phase"]) == ({h1: 3, h2: 1}, 0, "Progressing")
    p = sim.step()
    p = sim.step()
    assert (p.weight, sim.ro["status"]["currentStepIndex"]) == (20, 1)
    assert sim.ro["status"]["canary"]["weights"] == {
        "canary": {"weight": 20, "podTemplateHash": h2, "serviceName": "web-canary"},
        "stable": {"weight": 80, "podTemplateHash": h1, "serviceName": "web-stable"}}
    p = sim.step()
    assert sim.ro["status"]["phase"] == "Paused" and sim.ro["status"]["pauseConditions"][0]["reason"] == \
        "CanaryPauseStep" and p.weight == 20
    sim.now += 1
    sim.step()
    assert sim.ro["status"]["currentStepIndex"] == 1, "a 2s pause still holds after 1s"
    sim.now += 2
    sim.step()
    assert sim.ro["status"]["currentStepIndex"] == 2 and "pauseConditions" not in sim.ro["status"]
    p = sim.until(lambda p: p.weight == 60)
    assert p.replicas == {h1: 3, h2: 2}
    p = sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    st = sim.ro["status"]
    assert (st["stableRS"], p.weight, p.stable_hash, sim.rss[h1]["replicas"]) == (h2, 0, h2, 0)


def test_plan_abort_then_undo():
    sim = Sim(rollout([{"setWeight": 50}, {"pause": {}}]))
    sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    h1 = pod_template_hash(template("v1"))
    sim.set_template("v2")
    sim.until(lambda p: sim.ro["status"]["phase"] == "Paused")
    sim.ro["status"]["abort"] = True
    p = sim.step()
    st = sim.ro["status"]
    assert (st["phase"], p.weight, p.replicas[h1], p.stable_hash) == ("Degraded", 0, 1, h1)
    assert st["message"] == "RolloutAborted: Rollout aborted update to revision 2"
    assert p.replicas[pod_template_hash(template("v2"))] == 0 and "pauseConditions" not in st
    sim.set_template("v1")  # undo
    p = sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    st = sim.ro["status"]
    assert (st["stableRS"], st["currentStepIndex"], "abort" in st, p.weight) == (h1, 2, False, 0)


def test_plan_pause_holds_until_promoted():
    sim = Sim(rollout([{"setWeight": 50}, {"pause": {}}]))
    sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    sim.set_template("v2")
    sim.until(lambda p: sim.ro["status"]["phase"] == "Paused")
    sim.now += 3600
    for _ in range(3):
        assert sim.step().weight == 50 and sim.ro["status"]["phase"] == "Paused"
    del sim.ro["status"]["pauseConditions"]  # what `kubectl argo rollouts promote` does
    sim.until(lambda p: sim.ro["status"]["phase"] == "Healthy")
    assert sim.ro["status"]["stableRS"] == pod_template_hash(template("v2"))


def test_unsupported_strategy_and_steps_are_spec_errors():
    ro = rollout([])
    ro["spec"]["strategy"] = {"blueGreen": {"activeService": "web"}}
    with pytest.raises(SpecError, match="stand-in .* implements only spec.strategy.canary, not blueGreen"):
        plan(ro, {}, 0)
    with pytest.raises(SpecError, match="step 0 \\(analysis\\) is not implemented"):
        plan(rollout([{"analysis": {"templates": []}}]), {}, 0)


def test_sigterm_stops_it_promptly(tmp_path):
    """Even while the apiserver does not answer, SIGTERM ends the stand-in within a second or two, cleanly."""
    kc = tmp_path / "kubeconfig"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}))
    p = subprocess.Popen([sys.executable, "-m", "devcluster.rollouts_standin", "--kubeconfig", str(kc)], cwd=REPO,
                         stderr=subprocess.PIPE, text=True)
    banner = p.stderr.readline()
    assert "stand-in for the Argo Rollouts controller (test infrastructure, not Argo)" in banner
    time.sleep(1)  # into the loop of failing lists
    p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=10)
    assert p.returncode == 0 and time.monotonic() - t0 < 3, err
    assert "cannot list Rollouts yet" in err and "stopping" in err


# ---- against the real control plane -------------------------------------------------------------------------

VS_GVR = ("networking.istio.io", "v1")
RO_GVR = ("argoproj.io", "v1alpha1")


class Env:
    """One namespace of cluster main with the Services and VirtualService of a canary Rollout `web`."""

    def __init__(self, api, ns: str):
        from kubernetes import client

        self.ns, self.client = ns, client
        self.core, self.apps, self.co = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)

    def setup(self) -> None:
        self.core.create_namespace({"metadata": {"name": self.ns}})
        for svc in ("web-stable", "web-canary"):
            self.core.create_namespaced_service(self.ns, {"metadata": {"name": svc}, "spec": {
                "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})

        def dest(host: str, w: int) -> dict:
            return {"destination": {"host": host, "port": {"number": 80}}, "weight": w}

        self.co.create_namespaced_custom_object(*VS_GVR, self.ns, "virtualservices", {
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "web"},
            "spec": {"hosts": ["web"], "http": [
                {"name": "primary", "route": [dest("web-stable", 100), dest("web-canary", 0)]},
                {"name": "untouched", "match": [{"uri": {"prefix": "/admin"}}],
                 "route": [dest("web-stable", 100), dest("web-canary", 0)]}]}})

    def create(self, ro: dict) -> None:
        ro = copy.deepcopy(ro)
        ro["metadata"] = {"name": "web"}
        self.co.create_namespaced_custom_object(*RO_GVR, self.ns, "rollouts", ro)

    def ro(self) -> dict:
        return self.co.get_namespaced_custom_object(*RO_GVR, self.ns, "rollouts", "web")

    def status(self) -> dict:
        return self.ro().get("status") or {}

    def patch_status(self, status: dict) -> None:
        self.co.patch_namespaced_custom_object_status(*RO_GVR, self.ns, "rollouts", "web", {"status": status},
                                                      _content_type="application/merge-patch+json")

    def set_template(self, version: str) -> None:
        self.co.patch_namespaced_custom_object(*RO_GVR, self.ns, "rollouts", "web",
                                               [{"op": "replace", "path": "/spec/template", "value": template(version)}],
                                               _content_type="application/json-patch+json")

    def weights(self, route: str = "primary") -> tuple[int, int]:
        vs = self.co.get_namespaced_custom_object(*VS_GVR, self.ns, "virtualservices", "web")
        r = next(r for r in vs["spec"]["http"] if r["name"] == route)["route"]
        return r[0]["weight"], r[1]["weight"]

    def rs(self, version: str) -> dict:
        name = f"web-{pod_template_hash(template(version))}"
        return self.apps.read_namespaced_replica_set(name, self.ns).to_dict()

    def selector(self, svc: str) -> str | None:
        return (self.core.read_namespaced_service(svc, self.ns).spec.selector or {}).get(rs.HASH_LABEL)

    def diagnose(self) -> str:
        pods = self.core.list_namespaced_pod(self.ns).items
        lines = [f"status: {json.dumps(self.status(), indent=1)}", f"weights: {self.weights()}"]
        lines += [f"pod {p.metadata.name}: {p.status.phase} on {p.spec.node_name} ip {p.status.pod_ip} "
                  f"ready {[c.ready for c in p.status.container_statuses or []]}" for p in pods]
        return "\n".join(lines)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout:g}s\n{self.diagnose()}")
            time.sleep(0.1)

    def wait_healthy(self, version: str, timeout: float = 60) -> dict:
        h = pod_template_hash(template(version))
        self.wait(lambda: (s := self.status()).get("phase") == "Healthy" and s.get("stableRS") == h
                  and s.get("observedGeneration") == str(self.ro()["metadata"]["generation"]),
                  f"Rollout Healthy on {version}", timeout)
        return self.status()


@pytest.fixture
def env(kube):
    from kubernetes import client

    api = kube.api("dev-staging")
    e = Env(api, f"ro-{uuid.uuid4().hex[:8]}")
    e.setup()
    yield e
    client.CoreV1Api(api).delete_namespace(e.ns)


@pytest.mark.k8s
def test_first_rollout_becomes_healthy(env, kube):
    """No stable revision yet: one ReplicaSet at full scale, stable once available, both Services on its hash."""
    env.create(rollout([{"setWeight": 50}, {"pause": {}}], replicas=2))
    st = env.wait_healthy("v1")
    h = pod_template_hash(template("v1"))
    assert (st["currentPodHash"], st["currentStepIndex"], st["availableReplicas"]) == (h, 2, 2)
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Available": ("True", "AvailableReason"), "Progressing": ("True", "NewReplicaSetAvailable")}
    rs_ = env.rs("v1")
    assert rs_["status"]["available_replicas"] == 2
    assert rs_["spec"]["selector"]["match_labels"] == {"app": "web", rs.HASH_LABEL: h}
    assert rs_["spec"]["template"]["metadata"]["labels"][rs.HASH_LABEL] == h
    owner = rs_["metadata"]["owner_references"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Rollout", "web", True)
    assert env.selector("web-stable") == h and env.selector("web-canary") == h
    assert env.weights() == (100, 0)
    log = (kube.clusters["main"].root / "logs" / "rollouts-standin.log").read_text()
    assert "stand-in for the Argo Rollouts controller" in log


@pytest.mark.k8s
def test_canary_walks_its_steps_with_istio_weights(env):
    """setWeight 20 -> pause 2s -> setWeight 60 -> promoted: each weight seen in the VirtualService."""
    env.create(rollout([{"setWeight": 20}, {"pause": {"duration": "2s"}}, {"setWeight": 60}], replicas=3))
    env.wait_healthy("v1", timeout=90)
    h1, h2 = pod_template_hash(template("v1")), pod_template_hash(template("v2"))
    env.set_template("v2")
    seen: list[tuple[int, int]] = []
    canary_at: dict[int, int] = {}
    paused_for = 0.0
    deadline = time.monotonic() + 90
    while not ((st := env.status()).get("phase") == "Healthy" and st.get("stableRS") == h2):
        # Read in the order opposite to the stand-in's writes (scale up, weights, status, scale down), so that
        # what one read shows bounds what the next one may show.
        stable_n = env.rs("v1")["spec"]["replicas"]
        w = env.weights()
        if not seen or seen[-1] != w:
            seen.append(w)
        if w[1]:
            canary_n = env.rs("v2")["spec"]["replicas"]
            canary_at.setdefault(w[1], canary_n)
            assert canary_n >= canary_replicas(3, w[1]), "canary pods are there before their traffic"
            assert stable_n == 3, "the stable RS stays at full scale while the canary has traffic"
            assert st["canary"]["weights"]["canary"]["weight"] in {c for _, c in seen}, (st, seen)
            if st["canary"]["weights"]["canary"]["weight"]:
                assert st["canary"]["weights"]["stable"]["podTemplateHash"] == h1
        if st.get("phase") == "Paused":
            assert st["pauseConditions"][0]["reason"] == "CanaryPauseStep"
            paused_for += 0.1
        assert time.monotonic() < deadline, f"canary not done: weights seen {seen}\n{env.diagnose()}"
        time.sleep(0.1)
    assert [w for w in seen if w != (100, 0)] == [(80, 20), (40, 60)], seen
    assert env.weights() == (100, 0) and env.weights("untouched") == (100, 0)
    assert canary_at[20] == 1 and canary_at[60] >= 2  # after the last step the canary goes to full scale
    assert paused_for >= 0.5
    st = env.status()
    assert (st["currentPodHash"], st["currentStepIndex"], st["canary"]["weights"]["stable"]["podTemplateHash"]) \
        == (h2, 3, h2)
    env.wait(lambda: env.rs("v1")["spec"]["replicas"] == 0, "old stable RS scaled to 0")
    assert env.selector("web-stable") == h2 and env.selector("web-canary") == h2
    assert env.rs("v2")["metadata"]["annotations"][rs.REVISION] == "2"


@pytest.mark.k8s
def test_abort_returns_traffic_to_stable_and_undo_makes_it_healthy(env):
    env.create(rollout([{"setWeight": 50}, {"pause": {}}]))
    env.wait_healthy("v1")
    h1, h2 = pod_template_hash(template("v1")), pod_template_hash(template("v2"))
    env.set_template("v2")
    env.wait(lambda: env.status().get("phase") == "Paused" and env.weights() == (50, 50), "canary paused at 50")
    assert env.selector("web-canary") == h2 and env.selector("web-stable") == h1

    env.patch_status({"abort": True})  # `kubectl argo rollouts abort`
    env.wait(lambda: env.status().get("phase") == "Degraded", "Degraded after abort")
    st = env.status()
    assert st["message"] == "RolloutAborted: Rollout aborted update to revision 2"
    assert env.weights() == (100, 0)
    env.wait(lambda: env.rs("v2")["spec"]["replicas"] == 0, "canary RS scaled to 0")
    assert env.rs("v1")["spec"]["replicas"] == 1 and st["stableRS"] == h1

    env.set_template("v1")  # `kubectl argo rollouts undo`: the stable template back
    st = env.wait_healthy("v1")
    assert (st["currentPodHash"], st["currentStepIndex"], st.get("abort", False)) == (h1, 2, False)
    assert env.weights() == (100, 0) and env.selector("web-canary") == h1


@pytest.mark.k8s
def test_pause_without_duration_holds_until_pause_conditions_are_cleared(env):
    env.create(rollout([{"setWeight": 50}, {"pause": {}}]))
    env.wait_healthy("v1")
    env.set_template("v2")
    env.wait(lambda: env.status().get("phase") == "Paused", "paused")
    time.sleep(3)
    st = env.status()
    assert (st["phase"], st["currentStepIndex"], st["pauseConditions"][0]["reason"], st["controllerPause"]) == \
        ("Paused", 1, "CanaryPauseStep", True)
    assert env.weights() == (50, 50)
    env.patch_status({"pauseConditions": None})  # `kubectl argo rollouts promote`
    st = env.wait_healthy("v2")
    assert env.weights() == (100, 0) and "controllerPause" not in st


@pytest.mark.k8s
def test_unsupported_strategy_is_degraded_with_a_clear_message(env):
    ro = rollout([])
    ro["spec"]["strategy"] = {"blueGreen": {"activeService": "web-stable"}}
    env.create(ro)
    env.wait(lambda: env.status().get("phase") == "Degraded", "Degraded", timeout=20)
    st = env.status()
    assert st["message"] == ("InvalidSpec: the Argo Rollouts stand-in (devcluster/rollouts_standin.py) implements "
                             "only spec.strategy.canary, not blueGreen")
    assert st["conditions"][0]["type"] == "InvalidSpec"
    assert not env.apps.list_namespaced_replica_set(env.ns).items
