"""The Kubernetes deploy target: pure manifest builders first, then deploys on the real local control planes.

The cluster tests (marked k8s) run against the `kube` fixture: real etcd, kube-apiserver, controller-manager and
scheduler, and devcluster's node agent running pods as local processes on their own loopback IPs. Deployments,
ReplicaSets and EndpointSlices are made by the real controllers; readiness comes from the node agent's real
probes. No Argo Rollouts controller runs here: devcluster/rollouts_standin.py stands in for it (Rollout ->
ReplicaSets, canary steps, VirtualService weights, abort), and the product does its own side (analysis, abort,
undo) fully.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from codemind_dagster.resources import kube_manifests as m
from codemind_dagster.resources.clusters import (
    ARTIFACT_ANNOTATION,
    ENV_LABEL,
    MANAGED_BY,
    SERVICE_LABEL,
    ClusterMap,
)
from codemind_dagster.resources.runtime import SERVICE_APP, SUPPORT_SCRIPT, DeployError

REPO = Path(__file__).resolve().parents[1]
INTENT = REPO / "examples" / "intents" / "loyalty-points.yaml"
ART = "ab" * 32

# Appended to the generated app.py: which build answered, so a test can tell versions apart over HTTP.
TAG_ROUTE = '''

@app.get("/release-tag")
def _release_tag():
    return {"tag": "{tag}"}
'''
# Crashes at import, before uvicorn can listen: the pod's container exits non-zero.
CRASH = '''
print("{tag}: about to fail at import", flush=True)
raise RuntimeError("boom: {tag} cannot start")
'''
# Listens but /healthz never answers 200: the readiness probe keeps the pod out of service.
NOT_READY = '''
from fastapi.responses import JSONResponse as _JSONResponse

print("{tag}: health check is wired to fail", flush=True)
app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/healthz"]

@app.get("/healthz")
def _broken_healthz():
    return _JSONResponse({"status": "broken"}, status_code=503)
'''
# Passes the kubelet's readiness probe (HTTP 200) but reports itself degraded: only the analysis catches it.
DEGRADED = '''
print("{tag}: reports degraded health", flush=True)
app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/healthz"]

@app.get("/healthz")
def _degraded_healthz():
    return {"status": "degraded"}
'''


def release(env: str = "dev", ns: str = "codemind-dev", artifact: str = ART, **extra: str) -> m.Release:
    return m.Release.of("loyalty-points", env, ns, artifact, extra)


def bundle_files(tag: str, extra: str = "") -> dict[str, str]:
    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.domain.intent import parse_intent_text

    files = render_service(parse_intent_text(INTENT.read_text(), INTENT.name))
    files["service/app.py"] += (TAG_ROUTE + extra).replace("{tag}", tag)
    return files


# ============================================================================ pure: manifests, no cluster


def test_bundle_archive_is_reproducible_and_complete(tmp_path: Path) -> None:
    from codemind_dagster.domain.code import write_bundle

    files = bundle_files("v1")
    a, b = tmp_path / "a", tmp_path / "b"
    write_bundle(a, files)
    time.sleep(0.01)
    write_bundle(b, files)
    (b / "service" / "__pycache__").mkdir()
    (b / "service" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    first, second = m.bundle_archive(a), m.bundle_archive(b)
    assert first == second  # same files -> same bytes -> same ConfigMap, whatever the mtimes
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(files)
        assert tar.extractfile("service/app.py").read().decode() == files["service/app.py"]
    assert len(first) < m.MAX_BUNDLE_BYTES


def test_oversized_or_odd_bundles_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "app.py").write_text("app = None\n")
    (tmp_path / "service" / "blob.bin").write_bytes(os.urandom(950 * 1024))  # incompressible
    with pytest.raises(m.ManifestError, match=r"KiB as tar.gz; a ConfigMap carries at most 900 KiB"):
        m.bundle_archive(tmp_path)
    (tmp_path / "service" / "blob.bin").unlink()
    (tmp_path / "service" / "link").symlink_to("/etc/passwd")
    with pytest.raises(m.ManifestError, match="symlink"):
        m.bundle_archive(tmp_path)
    with pytest.raises(m.ManifestError, match="no service/app.py"):
        m.bundle_archive(tmp_path / "service")


def test_configmap_carries_the_bundle_immutably() -> None:
    cm = m.bundle_configmap(release(), b"archive-bytes")
    assert cm["metadata"]["name"] == f"loyalty-points-{ART[:12]}"
    assert cm["immutable"] is True
    assert base64.b64decode(cm["binaryData"][m.BUNDLE_KEY]) == b"archive-bytes"
    assert cm["metadata"]["labels"] == {**MANAGED_BY, SERVICE_LABEL: "loyalty-points", ENV_LABEL: "dev"}
    assert cm["metadata"]["annotations"][ARTIFACT_ANNOTATION] == ART


def test_deployment_rolls_over_safely_and_runs_the_bundle() -> None:
    opts = m.WorkloadOptions()
    d = m.deployment(release(GREETING="hi"), opts)
    spec = d["spec"]
    assert d["metadata"]["name"] == "loyalty-points" and d["metadata"]["namespace"] == "codemind-dev"
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert spec["progressDeadlineSeconds"] == opts.progress_deadline_s and spec["revisionHistoryLimit"] == 5
    tpl = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
    assert d["metadata"]["annotations"][ARTIFACT_ANNOTATION] == tpl["metadata"]["annotations"][ARTIFACT_ANNOTATION]
    (c,) = tpl["spec"]["containers"]
    assert c["image"] == "codemind/service-runtime:py3.11" and c["command"][:2] == ["/bin/sh", "-c"]
    script = c["command"][2]
    assert f"{m.BUNDLE_MOUNT}/{m.BUNDLE_KEY} {m.APP_DIR} {m.LAYER_MOUNT}/codemind_service.py" in script
    # The platform's service layer in front of the bundle's app, as LocalRuntime starts it.
    assert script.rstrip().endswith(f"exec python -m uvicorn {SERVICE_APP} --host $(POD_IP) --port 8080")
    assert SERVICE_APP == "codemind_service:app"
    assert tpl["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert tpl["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert tpl["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["CODEMIND_DATA_DIR"]["value"] == m.DATA_DIR and env["GREETING"]["value"] == "hi"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080, "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
    assert vols["bundle"]["configMap"]["name"] == f"loyalty-points-{ART[:12]}"
    layer_sha = hashlib.sha256(SUPPORT_SCRIPT.read_bytes()).hexdigest()
    assert vols["layer"]["configMap"]["name"] == f"loyalty-points-layer-{layer_sha[:10]}"
    assert "emptyDir" in vols["app"] and "emptyDir" in vols["data"]
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert mounts == {"bundle": m.BUNDLE_MOUNT, "layer": m.LAYER_MOUNT, "app": m.APP_DIR, "data": m.DATA_DIR}


def test_template_hash_follows_what_the_pods_run() -> None:
    opts = m.WorkloadOptions()

    def h(r: m.Release) -> str:
        return m.pod_template(r, opts)["metadata"]["annotations"][m.TEMPLATE_HASH_ANNOTATION]

    assert h(release()) == h(release())
    assert len({h(release()), h(release(artifact="cd" * 32)), h(release(GREETING="x"))}) == 3
    objs = m.release_objects(release(), opts, b"x", canary=False)
    again = m.release_objects(release(), opts, b"x", canary=False)
    assert [o["kind"] for o in objs] == ["ConfigMap", "ConfigMap", "Service", "Deployment"]
    assert objs == again
    assert m.spec_hash(objs) == objs[-1]["metadata"]["annotations"][m.SPEC_HASH_ANNOTATION]
    svc = objs[2]["spec"]
    assert svc["ports"] == [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


def test_pods_get_the_service_layer_beside_an_unchanged_bundle(tmp_path: Path) -> None:
    """The layer ships in its own ConfigMap named by its hash; the bundle's ConfigMap and archive stay the artifact's."""
    from codemind_dagster.domain.code import write_bundle

    files = bundle_files("v1")
    files["codemind_service.py"] = "raise SystemExit('a bundle file must not replace the platform layer')\n"
    write_bundle(tmp_path / "bundle", files)
    archive = m.bundle_archive(tmp_path / "bundle")
    layer = SUPPORT_SCRIPT.read_bytes()
    opts = m.WorkloadOptions()
    objs = m.release_objects(release(), opts, archive, canary=False)
    bundle_cm, layer_cm = objs[0], objs[1]
    assert base64.b64decode(bundle_cm["binaryData"][m.BUNDLE_KEY]) == archive  # the layer is not in it
    assert bundle_cm["metadata"]["annotations"][f"{ARTIFACT_ANNOTATION}-sha256"] == hashlib.sha256(archive).hexdigest()
    assert layer_cm["immutable"] is True and layer_cm["data"] == {"codemind_service.py": layer.decode()}
    assert layer_cm["metadata"]["annotations"] == {m.LAYER_SHA_ANNOTATION: hashlib.sha256(layer).hexdigest()}
    assert layer_cm["metadata"]["labels"] == bundle_cm["metadata"]["labels"]  # removed with the release

    # A new platform layer is a new revision of the same artifact; the bundle's ConfigMap does not change.
    newer = m.release_objects(release(), opts, archive, canary=False, layer=layer + b"\n# v2\n")
    assert newer[0] == bundle_cm and newer[1]["metadata"]["name"] != layer_cm["metadata"]["name"]
    tpl = objs[-1]["spec"]["template"]["metadata"]["annotations"][m.TEMPLATE_HASH_ANNOTATION]
    assert newer[-1]["spec"]["template"]["metadata"]["annotations"][m.TEMPLATE_HASH_ANNOTATION] != tpl
    assert m.spec_hash(newer) != m.spec_hash(objs)

    # The pod's unpack step, run for real on the ConfigMaps' contents: bundle files, then the layer over them.
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / m.BUNDLE_KEY).write_bytes(archive)
    (tmp_path / "cm" / "codemind_service.py").write_bytes(layer)
    app = tmp_path / "app"
    app.mkdir()
    (c,) = objs[-1]["spec"]["template"]["spec"]["containers"]
    [unpack] = [shlex.split(line) for line in c["command"][2].splitlines() if line.startswith("python -c")]
    assert unpack[3:] == [f"{m.BUNDLE_MOUNT}/{m.BUNDLE_KEY}", m.APP_DIR, f"{m.LAYER_MOUNT}/codemind_service.py"]
    subprocess.run([sys.executable, "-c", unpack[2], str(tmp_path / "cm" / m.BUNDLE_KEY), str(app),
                    str(tmp_path / "cm" / "codemind_service.py")], check=True)
    assert (app / "codemind_service.py").read_bytes() == layer
    assert (app / "service" / "app.py").read_text() == files["service/app.py"]


def test_canary_traffic_reads_only_the_intents_collections(tmp_path: Path) -> None:
    """Canary traffic GETs the collections the bundle's openapi.json lists (no path parameters, no /healthz)."""
    from codemind_dagster.domain.code import write_bundle
    from codemind_dagster.resources.kube_runtime import traffic_paths

    write_bundle(tmp_path / "b", bundle_files("v1"))
    spec = json.loads((tmp_path / "b" / "service" / "openapi.json").read_text())
    assert any("{" in p for p in spec["paths"]) and "/healthz" in spec["paths"]  # both left out below
    assert traffic_paths(tmp_path / "b") == ("/customers", "/points_transactions", "/rewards")
    (tmp_path / "b" / "service" / "openapi.json").unlink()
    assert traffic_paths(tmp_path / "b") == ("/",)  # any path still passes the fault layer


def test_bad_fault_settings_are_refused_before_the_api_is_asked(tmp_path: Path) -> None:
    """CODEMIND_FAULT_* is checked as LocalRuntime checks it, before any request (here: to an API that is down)."""
    from codemind_dagster.resources.kube_runtime import KubeRuntime, KubeUnreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rt = KubeRuntime(ClusterMap.parse(_kubeconfig(tmp_path / "config", port)))
    (tmp_path / "b" / "service").mkdir(parents=True)
    (tmp_path / "b" / "service" / "app.py").write_text("app = None\n")
    kw = {"service": "shop", "environment": "dev", "artifact": ART, "bundle_dir": tmp_path / "b"}
    for env, message in (({"CODEMIND_FAULT_ERROR_RATE": "lots"}, "CODEMIND_FAULT_ERROR_RATE must be a number, got 'lots'"),
                         ({"CODEMIND_FAULT_ERROR_RATE": "1.5"}, "CODEMIND_FAULT_ERROR_RATE must be a share from 0 to 1"),
                         ({"CODEMIND_FAULT_STATUS": "418", "CODEMIND_FAULT_ERROR_RATE": "1"},
                          "CODEMIND_FAULT_STATUS must be a 5xx status")):
        with pytest.raises(DeployError, match=f"^fault injection: {message}") as e:
            rt.deploy(**kw, env=env)
        assert not isinstance(e.value, KubeUnreachable)
    # A good setting gets as far as the API (down here), and `rollout=` of the local runtime's call is accepted.
    with pytest.raises(KubeUnreachable):
        rt.deploy(**kw, env={"CODEMIND_FAULT_ERROR_RATE": "0.5"}, rollout=object())


def test_production_is_a_canary_rollout_with_istio_routing() -> None:
    objs = m.release_objects(release("production", "codemind-production"), m.WorkloadOptions(), b"x", canary=True)
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    layer = m.layer_configmap_name("loyalty-points", SUPPORT_SCRIPT.read_bytes())
    assert set(by) == {("ConfigMap", f"loyalty-points-{ART[:12]}"), ("ConfigMap", layer), ("Service", "loyalty-points"),
                       ("Service", "loyalty-points-stable"), ("Service", "loyalty-points-canary"),
                       ("DestinationRule", "loyalty-points"), ("VirtualService", "loyalty-points"),
                       ("Rollout", "loyalty-points")}
    assert objs[-1]["kind"] == "Rollout"
    ro = by["Rollout", "loyalty-points"]
    assert ro["apiVersion"] == "argoproj.io/v1alpha1"
    canary = ro["spec"]["strategy"]["canary"]
    # The configured steps, then the analysis gate: the last weight holds until the product has judged it.
    assert canary["steps"] == [{"setWeight": 10}, {"pause": {"duration": "5s"}}, {"setWeight": 50},
                               {"pause": {"duration": "5s"}}, {"pause": {}}]
    assert m.rollout_steps([{"setWeight": 20}, {"pause": {}}]) == [{"setWeight": 20}, {"pause": {}}]
    assert canary["stableService"] == "loyalty-points-stable" and canary["canaryService"] == "loyalty-points-canary"
    assert canary["trafficRouting"] == {"istio": {"virtualService": {"name": "loyalty-points", "routes": ["primary"]}}}
    vs = by["VirtualService", "loyalty-points"]["spec"]
    (route,) = vs["http"]
    assert route["name"] == "primary"
    assert [(d["destination"]["host"], d["weight"]) for d in route["route"]] == [
        ("loyalty-points-stable", 100), ("loyalty-points-canary", 0)]
    dr = by["DestinationRule", "loyalty-points"]
    assert dr["apiVersion"] == "networking.istio.io/v1"
    assert dr["spec"]["host"] == "loyalty-points.codemind-production.svc.cluster.local"
    for o in objs:
        assert o["metadata"]["labels"][ENV_LABEL] == "production"


def test_canary_steps_and_names_are_validated() -> None:
    steps = m.check_canary_steps('[{"setWeight": 20}, {"pause": {}}, {"pause": {"duration": 30}}]')
    assert steps == ({"setWeight": 20}, {"pause": {}}, {"pause": {"duration": 30}})
    assert m.pause_seconds("1m") == 60
    for bad, msg in (("[]", "non-empty"), ('[{"setWeight": 120}]', "0..100"), ('[{"pause": {"duration": "soon"}}]',
                     "pause duration"), ('[{"analysis": {}}]', "setWeight"), ("{", "not JSON")):
        with pytest.raises(m.ManifestError, match=msg):
            m.check_canary_steps(bad)
    for name in ("Shop", "1shop", "shop_floor", "s" * 41, ""):
        with pytest.raises(m.ManifestError, match="DNS-1035"):
            m.Release.of(name, "dev", "ns", ART)
    with pytest.raises(m.ManifestError, match="set by the runtime"):
        release(CODEMIND_DATA_DIR="/elsewhere")
    with pytest.raises(m.ManifestError, match="content hash"):
        m.Release.of("shop", "dev", "ns", "not-a-hash")


def test_module_loads_without_the_kubernetes_package() -> None:
    code = ("import sys, codemind_dagster.resources.kube_runtime, codemind_dagster.resources.kube_manifests; "
            "print('kubernetes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dev-staging",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "dev-staging", "context": {"cluster": "gone", "user": "u"}}],
    }))
    return path


def test_unreachable_apiserver_names_context_kubeconfig_and_the_fix(tmp_path: Path) -> None:
    from codemind_dagster.resources.kube_runtime import KubeRuntime, KubeUnreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = _kubeconfig(tmp_path / "config", port)
    rt = KubeRuntime(ClusterMap.parse(kc))
    with pytest.raises(KubeUnreachable) as e:
        rt.status("shop", "dev")
    msg = str(e.value)
    assert "context 'dev-staging'" in msg and str(kc) in msg and "make k8s-up" in msg and f":{port}" in msg
    # A context the kubeconfig does not have, and an environment no context is mapped to.
    with pytest.raises(KubeUnreachable, match=r"no usable context 'production'.*make k8s-up"):
        rt.status("shop", "production")
    with pytest.raises(DeployError, match="no kubeconfig context for environment 'qa'"):
        rt.status("shop", "qa")
    with pytest.raises(KubeUnreachable, match="make k8s-up"):
        KubeRuntime(ClusterMap.parse(tmp_path / "missing")).list()


def test_resource_is_a_runtime_resource(tmp_path: Path) -> None:
    from codemind_dagster.resources.kube_runtime import KubeRuntime, KubeRuntimeResource
    from codemind_dagster.resources.platform import RuntimeResource

    res = KubeRuntimeResource(health_timeout_s=45, kubeconfig_path=str(tmp_path / "config"),
                              k8s_namespaces='{"dev": "team-dev"}', canary_steps_json='[{"setWeight": 25}]')
    assert isinstance(res, RuntimeResource)
    rt = res.runtime()
    assert isinstance(rt, KubeRuntime)
    assert rt.clusters.target("dev").namespace == "team-dev" and rt.clusters.target("production").context == "production"
    assert rt.options.canary_steps == ({"setWeight": 25},) and rt.options.progress_deadline_s == 75
    with pytest.raises(DeployError, match="canary steps"):
        KubeRuntimeResource(health_timeout_s=45, kubeconfig_path="x", canary_steps_json="[]").runtime()


# ============================================================================ on the real control planes


@pytest.fixture
def store(tmp_path: Path):
    from codemind_dagster.resources.artifacts import LocalArtifactStore

    return LocalArtifactStore(tmp_path / "artifacts")


def make(store, tag: str, extra: str = "") -> tuple[str, Path]:
    artifact = store.put_bundle(bundle_files(tag, extra))
    return artifact, store.bundle_dir(artifact)


@pytest.fixture
def rt(kube):
    from codemind_dagster.resources.kube_runtime import KubeRuntime

    runtime = KubeRuntime(ClusterMap.parse(kube.kubeconfig), health_timeout_s=60, stop_grace_s=20)
    made: list[tuple[str, str]] = []
    runtime.made = made  # type: ignore[attr-defined]
    yield runtime
    for service, env in made:
        runtime.stop(service, env)


def deploy(rt, service: str, environment: str, artifact_dir: tuple[str, Path], **kw):
    rt.made.append((service, environment))
    t0 = time.monotonic()
    out = rt.deploy(service=service, environment=environment, artifact=artifact_dir[0], bundle_dir=artifact_dir[1],
                    **kw)
    print(f"[timing] {service}/{environment} {artifact_dir[0][:12]}: {out.outcome} in {time.monotonic() - t0:.1f}s\n"
          f"    {out.reason}".replace("\n", "\n    "))
    return out


def api(kube, context: str = "dev-staging"):
    from kubernetes import client

    c = kube.api(context)
    return client.CoreV1Api(c), client.AppsV1Api(c), client.CustomObjectsApi(c)


def tag_of(url: str) -> str:
    return httpx.get(f"{url}/release-tag", timeout=5).json()["tag"]


class Poller:
    """Requests the service over and over during a rollout, resolving the URL from the EndpointSlices each time."""

    def __init__(self, rt, service: str, env: str, path: str = "/release-tag"):
        self.rt, self.service, self.env, self.path = rt, service, env, path
        self.ok: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _url(self) -> str | None:
        target = self.rt.clusters.target(self.env)
        api = self.rt._api(target.context)
        svc = f"{self.service}-stable" if self.env in self.rt.canary_environments else self.service
        eps = self.rt._ready_endpoints(api, target.namespace, svc)
        return f"http://{eps[0][0]}:8080" if eps else None

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                url = self._url()
                if url is None:
                    self.failures.append("no ready endpoint")
                else:
                    try:
                        r = client.get(f"{url}{self.path}", headers={"Connection": "close"})
                        if r.status_code == 200:
                            self.ok.append(r.json()["tag"])
                        else:
                            self.failures.append(f"{url}: HTTP {r.status_code}")
                    except httpx.HTTPError as e:
                        self.failures.append(f"{url}: {type(e).__name__} {e}")
                time.sleep(0.05)

    def __enter__(self) -> Poller:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.k8s
def test_dev_and_staging_serve_the_contract_from_a_real_deployment(kube, rt, store) -> None:
    """The real controllers and the node agent bring the Deployment to Available; the URL honours spec v1."""
    core, apps, _ = api(kube)
    v1 = make(store, "v1")
    for env, ns in (("dev", "codemind-dev"), ("staging", "codemind-staging")):
        out = deploy(rt, "loyalty-points", env, v1)
        assert out.outcome == "deployed", out.reason
        assert out.previous_artifact is None and out.pid is None
        d = apps.read_namespaced_deployment("loyalty-points", ns)
        conds = {c.type: c.status for c in d.status.conditions}
        assert conds["Available"] == "True" and d.status.available_replicas == 1
        assert d.metadata.annotations[ARTIFACT_ANNOTATION] == v1[0]
        assert d.spec.template.metadata.annotations[ARTIFACT_ANNOTATION] == v1[0]
        assert d.metadata.labels == {**MANAGED_BY, SERVICE_LABEL: "loyalty-points", ENV_LABEL: env}
        assert core.read_namespace(ns).metadata.labels["istio-injection"] == "enabled"
        cm = core.read_namespaced_config_map(f"loyalty-points-{v1[0][:12]}", ns)
        assert cm.immutable is True and m.BUNDLE_KEY in cm.binary_data
        svc = core.read_namespaced_service("loyalty-points", ns)
        assert (svc.spec.ports[0].port, svc.spec.ports[0].target_port) == (80, 8080)

        st = rt.status("loyalty-points", env)
        assert st.healthy and st.artifact == v1[0] and st.port == 8080
        assert st.url.startswith("http://127.77.") and st.url == out.url
        assert httpx.get(f"{st.url}/healthz", timeout=5).json() == {"status": "ok"}
        created = httpx.post(f"{st.url}/customers", json={"email": f"ada@{env}.example.com"}, timeout=5)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["tier"] == "bronze" and body["points"] == 0  # defaults applied
        read = httpx.get(f"{st.url}/customers/{body['id']}", timeout=5)
        assert read.status_code == 200 and read.json()["email"] == f"ada@{env}.example.com"
        assert httpx.post(f"{st.url}/customers", json={"email": "nope"}, timeout=5).status_code == 422
        assert httpx.get(f"{st.url}/customers/999", timeout=5).status_code == 404

    listed = {(s.service, s.environment) for s in rt.list()}
    assert {("loyalty-points", "dev"), ("loyalty-points", "staging")} <= listed
    assert len([s for s in rt.list() if s.service == "loyalty-points"]) == len(
        {s.environment for s in rt.list() if s.service == "loyalty-points"})  # no duplicates across contexts


@pytest.mark.k8s
def test_pods_serve_metrics_and_take_fault_injection_from_the_deploy(kube, rt, store) -> None:
    """Pods run the platform's service layer: GET /metrics answers through the pod, CODEMIND_FAULT_* passed to
    deploy() fail the service's routes but never /healthz, a fault change is a new revision, and a bad value is
    refused with nothing applied."""
    core, apps, _ = api(kube)
    svc, ns = "faulty", "codemind-dev"
    v1 = make(store, "v1")
    out = deploy(rt, svc, "dev", v1)
    assert out.outcome == "deployed", out.reason
    [pod] = core.list_namespaced_pod(ns, label_selector=f"{SERVICE_LABEL}={svc}").items
    assert {k: pod.metadata.annotations[k] for k in ("prometheus.io/scrape", "prometheus.io/port",
            "prometheus.io/path")} == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                                      "prometheus.io/path": "/metrics"}
    assert out.url == f"http://{pod.status.pod_ip}:8080"
    assert httpx.get(f"{out.url}/customers", timeout=5).status_code == 200
    assert tag_of(out.url) == "v1"
    metrics = httpx.get(f"{out.url}/metrics", timeout=5)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert 'http_requests_total{method="GET",route="/customers",status="200"} 1' in text
    assert 'http_requests_total{method="GET",route="/healthz",status="200"}' in text  # the kubelet's probes
    assert "process_resident_memory_bytes" in text and "codemind_fault_injection_config" not in text
    assert rt.status(svc, "dev").faults == ()

    # The same artifact with every request failing: a new revision, rolled out because /healthz stays 200.
    faults = {"CODEMIND_FAULT_ERROR_RATE": "1", "CODEMIND_FAULT_STATUS": "503"}
    out = deploy(rt, svc, "dev", v1, env=faults)
    assert out.outcome == "deployed", out.reason
    assert out.previous_artifact == v1[0]
    for path in ("/customers", "/release-tag", "/no-such-route"):
        r = httpx.get(f"{out.url}{path}", timeout=5)
        assert r.status_code == 503 and r.headers["x-codemind-fault"] == "error", (path, r.status_code, r.text)
        assert "injected fault (CODEMIND_FAULT_ERROR_RATE=1)" in r.json()["detail"]
    assert httpx.get(f"{out.url}/healthz", timeout=5).json() == {"status": "ok"}
    text = httpx.get(f"{out.url}/metrics", timeout=5).text
    assert 'codemind_fault_injection_config{setting="error_rate"} 1' in text
    assert 'codemind_faults_injected_total{kind="error"} 3' in text
    assert 'http_requests_total{method="GET",route="/customers",status="503"} 1' in text
    st = rt.status(svc, "dev")
    assert st.healthy and st.faults == tuple(sorted(faults.items()))
    env = {e.name: e.value for e in apps.read_namespaced_deployment(svc, ns).spec.template.spec.containers[0].env}
    assert env["CODEMIND_FAULT_ERROR_RATE"] == "1" and env["CODEMIND_FAULT_STATUS"] == "503"
    assert deploy(rt, svc, "dev", v1, env=faults).outcome == "unchanged"

    # A bad value: a clear error, and neither the live release nor a new service gets anything applied.
    def objects() -> set[tuple[str, str, str]]:
        lists = (core.list_namespaced_config_map, core.list_namespaced_service, apps.list_namespaced_deployment)
        return {(ls.__name__, o.metadata.name, o.metadata.resource_version) for ls in lists for o in ls(ns).items}

    before = objects()
    generation = apps.read_namespaced_deployment(svc, ns).metadata.generation
    for name in (svc, "never-applied"):
        with pytest.raises(DeployError, match=r"fault injection: CODEMIND_FAULT_ERROR_RATE must be a number, "
                                              r"got 'half'"):
            deploy(rt, name, "dev", v1, env={"CODEMIND_FAULT_ERROR_RATE": "half"})
    assert apps.read_namespaced_deployment(svc, ns).metadata.generation == generation
    assert objects() == before  # nothing in the namespace was created or changed
    assert not any(name.startswith("never-applied") for _, name, _ in before)
    assert httpx.get(f"{out.url}/customers", timeout=5).status_code == 503  # the drill still runs

    # Faults off again: another revision, serving normally.
    out = deploy(rt, svc, "dev", v1)
    assert out.outcome == "deployed", out.reason
    assert httpx.get(f"{out.url}/customers", timeout=5).status_code == 200 and rt.status(svc, "dev").faults == ()

    # The layer's ConfigMap deleted by hand: reported (new pods could not start), and put back by the next deploy.
    layer = m.layer_configmap_name(svc, SUPPORT_SCRIPT.read_bytes())
    core.delete_namespaced_config_map(layer, ns)
    assert any(f"ConfigMap {ns}/{layer} with the service layer is gone" in f for f in rt.status(svc, "dev").findings)
    assert deploy(rt, svc, "dev", v1).ok
    assert core.read_namespaced_config_map(layer, ns).data["codemind_service.py"] == SUPPORT_SCRIPT.read_text()
    assert rt.status(svc, "dev").findings == ()


@pytest.mark.k8s
def test_new_artifact_rolls_over_broken_ones_roll_back_same_one_is_unchanged(kube, rt, store) -> None:
    """RollingUpdate with the old ReplicaSet serving until the new one is Ready; crashes and readiness
    failures are undone to the previous revision with the pod's log in the reason; a repeat changes nothing."""
    core, apps, _ = api(kube)
    svc, ns = "rollover", "codemind-dev"
    v1, v2 = make(store, "v1"), make(store, "v2")
    assert deploy(rt, svc, "dev", v1).outcome == "deployed"

    with Poller(rt, svc, "dev") as poll:
        out = deploy(rt, svc, "dev", v2)
        time.sleep(1.0)
    assert out.outcome == "deployed", out.reason
    assert out.previous_artifact == v1[0]
    assert poll.failures == [], poll.failures[:5]
    assert "v1" in poll.ok and poll.ok[-1] == "v2"
    assert poll.ok.index("v2") > 0 and "v1" not in poll.ok[poll.ok.index("v2") + 5:]
    rsets = apps.list_namespaced_replica_set(ns, label_selector=f"{SERVICE_LABEL}={svc}").items
    assert sorted((r.spec.template.metadata.annotations[ARTIFACT_ANNOTATION], r.spec.replicas) for r in rsets) == \
        sorted([(v1[0], 0), (v2[0], 1)])

    # A release that crashes at import: rolled back, v2 keeps serving without a failed request.
    crash = make(store, "v3", CRASH)
    with Poller(rt, svc, "dev") as poll:
        out = deploy(rt, svc, "dev", crash)
    assert out.outcome == "rolled_back", out.reason
    assert out.previous_artifact == v2[0]
    assert "boom: v3 cannot start" in out.reason  # from pods/log
    assert "exit code" in out.reason and "container service" in out.reason  # its container state
    assert poll.failures == [] and set(poll.ok) == {"v2"}
    st = rt.status(svc, "dev")
    assert st.healthy and st.artifact == v2[0] and tag_of(st.url) == "v2"
    d = apps.read_namespaced_deployment(svc, ns)
    assert d.spec.template.metadata.annotations[ARTIFACT_ANNOTATION] == v2[0]
    assert d.metadata.annotations[ARTIFACT_ANNOTATION] == v2[0]

    # A release that listens but never gets Ready: rolled back when the health timeout runs out.
    rt.health_timeout_s = 12
    try:
        unready = make(store, "v4", NOT_READY)
        with Poller(rt, svc, "dev") as poll:
            out = deploy(rt, svc, "dev", unready)
    finally:
        rt.health_timeout_s = 60
    assert out.outcome == "rolled_back", out.reason
    assert "not Ready after 12s" in out.reason and "v4: health check is wired to fail" in out.reason
    assert poll.failures == [] and set(poll.ok) == {"v2"}
    assert rt.status(svc, "dev").artifact == v2[0]

    # The live artifact again: unchanged, and no object changes.
    before = {kind: read().metadata.resource_version for kind, read in (
        ("deployment", lambda: apps.read_namespaced_deployment(svc, ns)),
        ("service", lambda: core.read_namespaced_service(svc, ns)),
        ("configmap", lambda: core.read_namespaced_config_map(f"{svc}-{v2[0][:12]}", ns)))}
    again = deploy(rt, svc, "dev", v2)
    assert again.outcome == "unchanged", again.reason
    after = {"deployment": apps.read_namespaced_deployment(svc, ns).metadata.resource_version,
             "service": core.read_namespaced_service(svc, ns).metadata.resource_version,
             "configmap": core.read_namespaced_config_map(f"{svc}-{v2[0][:12]}", ns).metadata.resource_version}
    assert after == before
    # ConfigMaps of revisions no ReplicaSet refers to are gone; the live one stays.
    cms = {c.metadata.name for c in core.list_namespaced_config_map(ns, label_selector=f"{SERVICE_LABEL}={svc}").items}
    assert f"{svc}-{v2[0][:12]}" in cms


@pytest.mark.k8s
def test_first_deploy_that_fails_leaves_nothing(kube, rt, store) -> None:
    core, apps, _ = api(kube)
    out = deploy(rt, "firstfail", "staging", make(store, "v1", CRASH))
    assert out.outcome == "failed", out.reason
    assert "nothing is running" in out.reason and "boom: v1 cannot start" in out.reason
    assert rt.status("firstfail", "staging") is None
    sel = f"{SERVICE_LABEL}=firstfail"
    assert apps.list_namespaced_deployment("codemind-staging", label_selector=sel).items == []
    assert core.list_namespaced_service("codemind-staging", label_selector=sel).items == []
    assert core.list_namespaced_config_map("codemind-staging", label_selector=sel).items == []


DIE_AFTER_APPLY = """
import os, sys
from pathlib import Path
from codemind_dagster.resources import kube_runtime as kr
from codemind_dagster.resources.clusters import ClusterMap

# Stands in for a deployer killed right after it applied the Deployment.
kr._DeploymentDeploy.wait = lambda *a, **k: os._exit(3)
rt = kr.KubeRuntime(ClusterMap.parse(Path(sys.argv[1])), health_timeout_s=60)
rt.deploy(service="crashed", environment="dev", artifact=sys.argv[2], bundle_dir=Path(sys.argv[3]))
"""


@pytest.mark.k8s
def test_deploy_killed_after_applying_is_adopted_not_redone(kube, rt, store) -> None:
    _, apps, _ = api(kube)
    v1 = make(store, "v1")
    rt.made.append(("crashed", "dev"))
    p = subprocess.run([sys.executable, "-c", DIE_AFTER_APPLY, str(kube.kubeconfig), v1[0], str(v1[1])],
                       capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert p.returncode == 3, p.stderr
    d = apps.read_namespaced_deployment("crashed", "codemind-dev")
    generation = d.metadata.generation
    out = deploy(rt, "crashed", "dev", v1)
    assert out.outcome == "deployed" and "adopted" in out.reason, out.reason
    d = apps.read_namespaced_deployment("crashed", "codemind-dev")
    assert d.metadata.generation == generation  # the template was not applied again with anything new
    rsets = apps.list_namespaced_replica_set("codemind-dev", label_selector=f"{SERVICE_LABEL}=crashed").items
    assert len(rsets) == 1
    assert deploy(rt, "crashed", "dev", v1).outcome == "unchanged"
    assert rt.stop("crashed", "dev") is True
    assert rt.status("crashed", "dev") is None
    assert rt.stop("crashed", "dev") is False


@pytest.mark.k8s
def test_production_canary_walks_the_steps_and_a_failing_canary_is_aborted(kube, rt, store) -> None:
    """Production is an Argo Rollouts canary. devcluster/rollouts_standin.py stands in for the Argo Rollouts
    controller (no real one runs here): it walks the steps and moves the Istio VirtualService weights; this test
    checks that the Rollout, VirtualService and DestinationRule pass the real CRD schemas, that the weights
    really move during the canary, and that the product's analysis aborts a degraded canary and undoes it."""
    core, _, crd = api(kube, "production")
    svc, ns = "canary-shop", "codemind-production"
    v1, v2 = make(store, "v1"), make(store, "v2")

    first = deploy(rt, svc, "production", v1)
    assert first.outcome == "deployed", first.reason
    ro = crd.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "rollouts", svc)
    assert ro["status"]["phase"] == "Healthy" and ro["status"]["stableRS"] == ro["status"]["currentPodHash"]
    crd.get_namespaced_custom_object("networking.istio.io", "v1", ns, "destinationrules", svc)
    for name in (svc, f"{svc}-stable", f"{svc}-canary"):
        core.read_namespaced_service(name, ns)

    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch_weights() -> None:
        while not stop.is_set():
            vs = crd.get_namespaced_custom_object("networking.istio.io", "v1", ns, "virtualservices", svc)
            route = next(r for r in vs["spec"]["http"] if r["name"] == "primary")
            w = {d["destination"]["host"]: d.get("weight", 0) for d in route["route"]}
            pair = (w[f"{svc}-stable"], w[f"{svc}-canary"])
            if not seen or seen[-1] != pair:
                seen.append(pair)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_weights, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with Poller(rt, svc, "production") as poll:
            out = deploy(rt, svc, "production", v2)
    finally:
        stop.set()
        watcher.join(5)
    print(f"[timing] canary v1 -> v2: {time.monotonic() - t0:.1f}s, weights seen {seen}")
    assert out.outcome == "deployed", out.reason
    assert out.previous_artifact == v1[0]
    assert (90, 10) in seen and (50, 50) in seen and seen[-1] == (100, 0)
    assert seen.index((90, 10)) < seen.index((50, 50))
    assert "after step 0 (setWeight 10)" in out.reason and "after step 2 (setWeight 50)" in out.reason
    # Each pause's traffic was judged on the pods' /metrics, and the last weight only after the analysis gate.
    judged = [line for line in out.reason.splitlines() if line.strip().startswith("traffic ")]
    assert len(judged) == 2 and all("pods' /metrics" in j and "passed" in j for j in judged), judged
    assert judged[0].strip().startswith("traffic at 10%") and judged[1].strip().startswith("traffic at 50%")
    assert [(r["weight"], r["passed"]) for r in out.canary] == [(10, True), (50, True)], out.canary
    assert all(r["canary_requests"] >= 20 and r["stable_requests"] >= 20 for r in out.canary)
    assert out.reason.index("paused at step 4") < out.reason.index("promoted (100% to the new revision)")
    assert poll.failures == [], poll.failures[:5]
    ro = crd.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "rollouts", svc)
    assert ro["status"]["phase"] == "Healthy" and ro["status"]["stableRS"] == ro["status"]["currentPodHash"]
    st = rt.status(svc, "production")
    assert st.healthy and st.artifact == v2[0] and tag_of(st.url) == "v2"
    assert deploy(rt, svc, "production", v2).outcome == "unchanged"

    # A canary that passes the kubelet's readiness probe but reports itself degraded: the analysis at the
    # first step fails, the product aborts (status.abort) and undoes to the stable revision's template.
    bad = make(store, "v3", DEGRADED)
    aborted = threading.Event()

    def watch_abort() -> None:
        while not aborted.is_set() and not stop2.is_set():
            r = crd.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "rollouts", svc)
            if (r.get("status") or {}).get("abort"):
                aborted.set()
            time.sleep(0.1)

    stop2 = threading.Event()
    t = threading.Thread(target=watch_abort, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with Poller(rt, svc, "production") as poll:
            out = deploy(rt, svc, "production", bad)
    finally:
        stop2.set()
        t.join(5)
    print(f"[timing] failing canary aborted and undone in {time.monotonic() - t0:.1f}s")
    assert out.outcome == "rolled_back", out.reason
    assert out.previous_artifact == v2[0]
    assert aborted.is_set()
    assert "analysis failed after step 0 (setWeight 10)" in out.reason
    assert "unexpected body" in out.reason and "degraded" in out.reason  # what was measured
    assert "v3: reports degraded health" in out.reason  # the canary pod's log
    assert poll.failures == []
    ro = crd.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "rollouts", svc)
    assert ro["status"]["phase"] == "Healthy" and not ro["status"].get("abort")
    assert ro["spec"]["template"]["metadata"]["annotations"][ARTIFACT_ANNOTATION] == v2[0]
    vs = crd.get_namespaced_custom_object("networking.istio.io", "v1", ns, "virtualservices", svc)
    weights = {d["destination"]["host"]: d.get("weight", 0) for d in vs["spec"]["http"][0]["route"]}
    assert weights == {f"{svc}-stable": 100, f"{svc}-canary": 0}
    st = rt.status(svc, "production")
    assert st.healthy and st.artifact == v2[0] and tag_of(st.url) == "v2"
    assert any(s.service == svc and s.environment == "production" for s in rt.list())


@pytest.mark.k8s
def test_production_canary_with_injected_errors_is_aborted_on_its_metrics(kube, rt, store) -> None:
    """A canary that passes every health check but fails half its requests (CODEMIND_FAULT_ERROR_RATE=0.5) is
    caught by the traffic analysis of the pods' /metrics at the first weight, aborted and undone; the reason
    carries the figures."""
    _, _, crd = api(kube, "production")
    svc, ns = "drill-shop", "codemind-production"
    v1 = make(store, "v1")
    assert deploy(rt, svc, "production", v1).outcome == "deployed"
    with Poller(rt, svc, "production") as poll:
        out = deploy(rt, svc, "production", v1, env={"CODEMIND_FAULT_ERROR_RATE": "0.5"})
    assert out.outcome == "rolled_back", out.reason
    assert out.previous_artifact == v1[0]
    *_, last = out.canary  # the windows judged, as the deployment asset records them
    assert last["weight"] == 10 and last["passed"] is False and last["stable_error_rate"] == 0.0, out.canary
    assert 0.4 <= last["canary_error_rate"] <= 0.6 and last["canary_requests"] >= 20, last  # half of them failed
    assert "canary analysis" in out.reason and last["detail"] in out.reason and "error rate" in last["detail"]
    [figures] = [line for line in out.reason.splitlines() if line.strip().startswith("traffic at 10%")]
    assert "FAILED" in figures and f"canary {last['canary_requests']} requests" in figures, figures
    assert "injected fault" not in out.reason  # the access log of our own traffic is left out of the log tail
    assert poll.failures == [], poll.failures[:5]  # stable kept serving
    ro = crd.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "rollouts", svc)
    assert ro["status"]["phase"] == "Healthy" and not ro["status"].get("abort")
    env = {e["name"] for e in ro["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "CODEMIND_FAULT_ERROR_RATE" not in env
    st = rt.status(svc, "production")
    assert st.healthy and st.faults == () and httpx.get(f"{st.url}/customers", timeout=5).status_code == 200


@pytest.mark.k8s
def test_list_and_stop_all_span_both_clusters(kube, store) -> None:
    """A runtime mapped onto its own namespace in cluster main (dev) and cluster dr: list() and stop_all()
    cover both contexts, and the dr release runs on the dr cluster's node (pod IPs 127.78.x.y)."""
    from codemind_dagster.resources.kube_runtime import KubeRuntime

    ns = "codemind-stopall"
    clusters = ClusterMap(kubeconfig=kube.kubeconfig, contexts={"dev": "dev-staging", "dr": "dr"},
                          namespaces={"dev": ns, "dr": ns})
    rt = KubeRuntime(clusters, health_timeout_s=60, stop_grace_s=20)
    v1 = make(store, "v1")
    try:
        for env in ("dev", "dr"):
            assert rt.deploy(service="inventory", environment=env, artifact=v1[0], bundle_dir=v1[1]).ok
        listed = {s.environment: s for s in rt.list()}
        assert set(listed) == {"dev", "dr"}
        assert listed["dev"].url.startswith("http://127.77.") and listed["dr"].url.startswith("http://127.78.")
        assert all(s.healthy and s.artifact == v1[0] for s in listed.values())
    finally:
        stopped = rt.stop_all()
    assert stopped == 2
    assert rt.list() == [] and rt.status("inventory", "dr") is None
    core, _, _ = api(kube, "dr")
    assert core.list_namespaced_pod(ns).items == []
