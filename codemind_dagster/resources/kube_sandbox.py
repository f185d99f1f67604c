"""The k8s profile's test sandbox: each test run is a pod in codemind-sandbox, launched with PipesK8sClient.

The namespace denies all ingress and egress (the node agent gives such pods a network namespace of their own),
the pod mounts no ServiceAccount token and gets no Secret or env of the control plane: the code under test
arrives in a ConfigMap, and the report comes back through Dagster Pipes messages in the pod's log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from codemind_dagster.resources.clusters import MANAGED_BY, ClusterMap
from codemind_dagster.resources.platform import TestSandboxResource

NAMESPACE = "codemind-sandbox"
SERVICE_ACCOUNT = "codemind-sandbox"
IMAGE = "codemind/code-location:dev"
INPUT_DIR = "/codemind/input"
SCRATCH_DIR = "/codemind/scratch"
CONFIGMAP_LIMIT = 1_000_000  # a ConfigMap holds at most 1 MiB; keep room for metadata
RUN_LABEL = "codemind.dev/test-run"
RUN_AS = 10001
# The pod's own startup (interpreter, imports, Pipes handshake) on top of the tests' own time limit.
POD_OVERHEAD_S = 120.0


class SandboxPodError(RuntimeError):
    """The sandbox pod could not run or did not report; names the pod and what it said."""


def namespace_objects() -> list[dict[str, Any]]:
    """The sandbox namespace, its token-less ServiceAccount and the two deny-all NetworkPolicies."""
    meta = lambda name, **kw: {"name": name, "labels": dict(MANAGED_BY), **kw}
    psa = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {**MANAGED_BY, **psa}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(SERVICE_ACCOUNT, namespace=NAMESPACE),
         "automountServiceAccountToken": False},
        *({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": meta(f"deny-all-{d.lower()}", namespace=NAMESPACE),
           "spec": {"podSelector": {}, "policyTypes": [d]}} for d in ("Egress", "Ingress")),
    ]


def pod_spec(configmap: str, memory_mb: int) -> dict[str, Any]:
    """Base pod spec: no token, no host access, the input read-only, a scratch emptyDir."""
    return {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        # The `restricted` Pod Security level the namespace enforces; the UID is the image's (deploy/Dockerfile).
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "tests",
            "image": IMAGE,
            "workingDir": SCRATCH_DIR,
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "resources": {"limits": {"memory": f"{memory_mb + 256}Mi", "cpu": "1"},
                          "requests": {"memory": "256Mi", "cpu": "100m"}},
            "env": [{"name": "CODEMIND_TEST_INPUT", "value": f"{INPUT_DIR}/run.json"},
                    {"name": "CODEMIND_SCRATCH", "value": SCRATCH_DIR}],
            "volumeMounts": [{"name": "input", "mountPath": INPUT_DIR, "readOnly": True},
                             {"name": "scratch", "mountPath": SCRATCH_DIR}],
        }],
        "volumes": [{"name": "input", "configMap": {"name": configmap}},
                    {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
    }


class KubeSandbox:
    """Runs the testing agent in a pod of the sandbox namespace and returns its TestReport."""

    def __init__(self, clusters: ClusterMap, context: str, *, timeout_s: float, memory_mb: int,
                 poll_s: float = 0.5):
        self.clusters, self.context = clusters, context
        self.timeout_s, self.memory_mb, self.poll_s = timeout_s, memory_mb, poll_s

    def test(self, context, *, bundle: dict[str, str], suite, artifact: str, workdir: Path):
        """Test one artifact in a fresh pod; evidence files land in `workdir` as with the local sandbox."""
        from codemind_dagster.domain.testing import TestReport
        from codemind_dagster.pods.test_run import REPORT_MESSAGE

        payload = json.dumps({"bundle": bundle, "suite": suite.files, "artifact": artifact,
                              "timeout_s": self.timeout_s, "memory_mb": self.memory_mb})
        if len(payload.encode()) > CONFIGMAP_LIMIT:
            raise SandboxPodError(f"the bundle and its tests take {len(payload.encode()) // 1024} KiB, more than a "
                                  f"ConfigMap holds ({CONFIGMAP_LIMIT // 1024} KiB): the sandbox pod cannot get them")
        core = self._core()
        self.ensure_namespace()
        name = f"test-{artifact[:12]}-{context.run_id[:8]}-{int(time.time() * 1000) % 10**8}"
        core.create_namespaced_config_map(NAMESPACE, {
            "metadata": {"name": name, "labels": {**MANAGED_BY, RUN_LABEL: context.run_id[:63]}},
            "data": {"run.json": payload}, "immutable": True})
        try:
            messages = self._run_pod(context, core, name)
        finally:
            with contextlib.suppress(Exception):
                core.delete_namespaced_config_map(name, NAMESPACE)
        found = [m for m in messages if isinstance(m, dict) and m.get("kind") == REPORT_MESSAGE]
        if not found:
            raise SandboxPodError(f"sandbox pod for {artifact[:12]} in {NAMESPACE} ended without a test report; "
                                  "its log is in the run's stdout/stderr")
        for fname, data in found[-1]["evidence"].items():
            (workdir / Path(fname).name).write_bytes(base64.b64decode(data))
        return TestReport.model_validate(found[-1]["report"])

    def ensure_namespace(self) -> None:
        """Creates what is missing of namespace_objects(); existing objects are left as they are."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = self.clusters.api_client(self.context)
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        create = {"Namespace": lambda o: core.create_namespace(o),
                  "ServiceAccount": lambda o: core.create_namespaced_service_account(NAMESPACE, o),
                  "NetworkPolicy": lambda o: net.create_namespaced_network_policy(NAMESPACE, o)}
        for obj in namespace_objects():
            try:
                create[obj["kind"]](obj)
            except ApiException as e:
                if e.status != 409:
                    raise SandboxPodError(f"cannot create {obj['kind']} {obj['metadata']['name']} in context "
                                          f"{self.context!r}: HTTP {e.status} {e.reason}") from e

    def _core(self):
        from kubernetes import client

        return client.CoreV1Api(self.clusters.api_client(self.context))

    def _run_pod(self, context, core, configmap: str) -> list[Any]:
        from dagster_k8s import PipesK8sClient
        from dagster_k8s.pipes import get_pod_name

        self._wait_gone(core, get_pod_name(context.run_id, context.op.name))
        pipes = PipesK8sClient(kubeconfig_file=str(self.clusters.kubeconfig), kube_context=self.context,
                               load_incluster_config=False, poll_interval=self.poll_s)
        try:
            invocation = pipes.run(
                context=context, image=IMAGE, namespace=NAMESPACE,
                command=["python", "-m", "codemind_dagster.pods.test_run"],
                base_pod_meta={"labels": {**MANAGED_BY, RUN_LABEL: context.run_id[:63]}},
                base_pod_spec=pod_spec(configmap, self.memory_mb),
                pod_wait_timeout=self.timeout_s * 3 + POD_OVERHEAD_S,
            )
        except Exception as e:
            raise SandboxPodError(f"sandbox pod in {NAMESPACE} (context {self.context!r}) failed: {_why(e)}") from e
        return invocation.get_custom_messages()

    def _wait_gone(self, core, pod: str, timeout_s: float = 60.0) -> None:
        """PipesK8sClient names the pod after run and step: a repair round reuses it once the last one is gone."""
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                core.read_namespaced_pod(pod, NAMESPACE)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(self.poll_s)
        raise SandboxPodError(f"pod {NAMESPACE}/{pod} of an earlier test round is still being deleted after "
                              f"{timeout_s:.0f} s")


def _why(e: Exception) -> str:
    """One line: the apiserver's own message for an API refusal, else the exception's first line."""
    body = getattr(e, "body", None)
    if getattr(e, "status", None) and body:
        with contextlib.suppress(ValueError, TypeError):
            return f"HTTP {e.status} {e.reason}: {json.loads(body).get('message', '')}".strip()
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class KubeSandboxResource(TestSandboxResource):  # a TestSandboxResource, so test_results takes this one
    """Test runs as pods in the sandbox namespace of one kubeconfig context."""

    kubeconfig_path: str
    context: str = "dev-staging"

    def kube(self) -> KubeSandbox:
        clusters = ClusterMap.parse(Path(self.kubeconfig_path))
        return KubeSandbox(clusters, self.context, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def test(self, context, *, bundle: dict[str, str], suite, artifact: str, workdir: Path):
        return self.kube().test(context, bundle=bundle, suite=suite, artifact=artifact, workdir=workdir)
