"""The k8s profile's test sandbox: the testing agent in a pod of codemind-sandbox, launched with PipesK8sClient.

Runs on the session's real control plane; the node agent gives pods of a deny-all-egress namespace their own
network namespace, so what the code under test cannot reach here is really unreachable, not assumed.
"""

from __future__ import annotations

import socket
from pathlib import Path

import dagster as dg
import pytest

from codemind_dagster.agents.contract.suite import render_contract_suite
from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.code import ContractSuite, bundle_hash
from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.resources.kube_sandbox import NAMESPACE, KubeSandboxResource, SandboxPodError

SECRET = "s3cr3t-value-that-must-not-reach-the-sandbox"

# An own test of the bundle that passes only where it is isolated: no route to the host's listener, no
# control-plane secret in its environment, no ServiceAccount token on disk.
ESCAPE_TEST = '''
import os, socket
from pathlib import Path

def test_the_sandbox_is_closed():
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", {port}))
        reached = True
    except OSError:
        reached = False
    finally:
        s.close()
    assert not reached, "reached the host's listener"
    assert "{secret}" not in repr(dict(os.environ)), "a control-plane secret is in the environment"
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists(), "a token is mounted"
'''


@pytest.fixture
def intent(examples):
    return read_intent_file(examples / "inventory-catalog.yaml")


@pytest.fixture
def listener():
    """A TCP listener on the host's loopback; generated code must not reach it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def resource(kubeconfig: Path, tmp_path: Path, **kw) -> KubeSandboxResource:
    return KubeSandboxResource(root=str(tmp_path / "sandbox"), timeout_s=kw.pop("timeout_s", 120),
                               memory_mb=kw.pop("memory_mb", 2048), coverage_threshold=80,
                               kubeconfig_path=str(kubeconfig), **kw)


def test_in_pod(sandbox: KubeSandboxResource, intent, bundle: dict[str, str], tmp_path: Path):
    """Materializes one asset that tests `bundle` through the resource; returns (report, workdir, run result)."""
    suite = ContractSuite(files=render_contract_suite(intent))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    seen = {}

    @dg.asset
    def tested(context, sandbox: KubeSandboxResource):
        seen["report"] = sandbox.test(context, bundle=bundle, suite=suite, artifact=bundle_hash(bundle),
                                      workdir=workdir)
        return dg.MaterializeResult(metadata={"passed": seen["report"].passed})

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([tested], resources={"sandbox": sandbox}, raise_on_error=False, instance=instance)
    result.logs = [e.user_message for e in instance.all_logs(result.run_id)]
    return seen.get("report"), workdir, result


test_in_pod.__test__ = False  # a helper, not a test


def root_error(result):
    """The user code's own error under Dagster's step-execution wrapper."""
    error = result.failure_data_for_node("tested").error
    while error.cause is not None:
        error = error.cause
    return error


@pytest.mark.k8s
def test_generated_code_is_tested_in_an_isolated_pod(kube, intent, tmp_path, listener, monkeypatch):
    """The suite runs in codemind-sandbox; the pod cannot reach the host, sees no secret and has no token."""
    from codemind_dagster.agents.testing import run_tests
    from codemind_dagster.resources.sandbox import SubprocessSandbox

    monkeypatch.setenv("CODEMIND_ANTHROPIC_API_KEY", SECRET)
    bundle = render_service(intent)
    bundle["tests/test_escape.py"] = ESCAPE_TEST.format(port=listener, secret=SECRET)

    report, workdir, result = test_in_pod(resource(kube.kubeconfig, tmp_path), intent, bundle, tmp_path)
    assert result.success, result.all_events
    assert report.sandbox_reason is None, report.sandbox_reason
    assert report.contract.passed > 20 and report.contract.failed == report.contract.errors == 0
    assert report.own.failed == 0, report.failures
    assert report.coverage_percent >= 80
    assert sorted(p.name for p in workdir.iterdir()) == ["bandit.json", "coverage.json", "junit.xml"]
    assert "test_the_sandbox_is_closed" in (workdir / "junit.xml").read_text()
    # The pod's own log lines reached the run as Dagster log events, through Pipes.
    assert any("in pod dagster-" in m for m in result.logs), result.logs

    # The same bundle in the local subprocess sandbox reaches the listener: the escape test can fail.
    box = SubprocessSandbox(tmp_path / "local")
    (box.root / "w").mkdir(parents=True)
    local = run_tests(bundle=bundle, suite=ContractSuite(files=render_contract_suite(intent)),
                      artifact=bundle_hash(bundle), workdir=box.root / "w", sandbox=box)
    assert local.own.failed == 1 and any("test_the_sandbox_is_closed" in f for f in local.failures)

    from kubernetes import client

    core, net = client.CoreV1Api(kube.api()), client.NetworkingV1Api(kube.api())
    policies = {p.metadata.name: p.spec.policy_types for p in net.list_namespaced_network_policy(NAMESPACE).items}
    assert policies == {"deny-all-egress": ["Egress"], "deny-all-ingress": ["Ingress"]}
    assert core.read_namespaced_service_account("codemind-sandbox", NAMESPACE).automount_service_account_token is False
    # The pod and the ConfigMap with the code are removed with the run.
    assert core.list_namespaced_pod(NAMESPACE).items == []
    assert core.list_namespaced_config_map(NAMESPACE, label_selector="codemind.dev/test-run").items == []


@pytest.mark.k8s
def test_hanging_code_is_killed_in_the_pod_at_the_time_limit(kube, intent, tmp_path):
    """The time limit holds inside the pod; the report says so and the pod is gone afterwards."""
    bundle = render_service(intent)
    bundle["service/app.py"] += "\nimport time\ntime.sleep(10_000)\n"
    report, _, result = test_in_pod(resource(kube.kubeconfig, tmp_path, timeout_s=8), intent, bundle, tmp_path)
    assert result.success
    assert report.sandbox_reason and "time limit" in report.sandbox_reason


def test_a_bundle_too_big_for_a_configmap_is_refused_before_any_pod(intent, tmp_path):
    """Refused with the sizes named, without contacting a cluster (the kubeconfig does not even exist)."""
    bundle = render_service(intent)
    bundle["service/blob.py"] = "X = '" + "x" * 1_100_000 + "'\n"
    report, _, result = test_in_pod(resource(tmp_path / "no-kubeconfig", tmp_path), intent, bundle, tmp_path)
    assert report is None and not result.success
    error = root_error(result)
    assert error.cls_name == SandboxPodError.__name__
    assert "more than a ConfigMap holds" in error.message


def test_an_unreachable_cluster_names_the_fix(intent, tmp_path):
    """No kubeconfig: the error says how to start the clusters instead of a client stack trace."""
    report, _, result = test_in_pod(resource(tmp_path / "no-kubeconfig", tmp_path), intent,
                                    render_service(intent), tmp_path)
    assert report is None and not result.success
    assert "make k8s-up" in root_error(result).message
