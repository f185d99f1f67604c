"""The node agent under the real control plane: real Job, Deployment and EndpointSlice controllers, real scheduler."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devcluster import podrun
from devcluster.nodeagent import default_image_map

pytestmark = pytest.mark.k8s

IMAGE = "codemind/test:1"
TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (.*)$")
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


# ---- helpers -------------------------------------------------------------------------------------

def wait(fn, timeout: float = 30.0, what: str = "condition", every: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - an object not created yet reads as 404
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


@pytest.fixture
def core(kube):
    from kubernetes import client

    return client.CoreV1Api(kube.api("dev-staging"))


@pytest.fixture
def ns(kube, core, request):
    """A fresh namespace on cluster main, deleted at the end (its pods' processes go with it)."""
    from kubernetes import client

    name = f"na-{request.node.name[5:30].replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}".lower()
    core.create_namespace({"metadata": {"name": name}})
    wait(lambda: core.read_namespaced_service_account("default", name), what="the default ServiceAccount")
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException:
        pass


def python_pod(name: str, script: str, *, restart: str = "Never", **container) -> dict:
    spec = {"restartPolicy": restart, "terminationGracePeriodSeconds": 2, "containers": [
        {"name": "main", "image": IMAGE, "command": ["python", "-u", "-c", textwrap.dedent(script)], **container}]}
    return {"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def pod_json(core, ns: str, name: str) -> dict:
    return json.loads(core.read_namespaced_pod(name, ns, _preload_content=False).data)


def phase_is(core, ns, name, *phases):
    return lambda: (p := pod_json(core, ns, name))["status"].get("phase") in phases and p


def logs(core, ns: str, name: str, **kw) -> str:
    # With content preloaded, client 36 returns str(bytes) for pods/log; dagster-k8s reads it raw as well.
    return core.read_namespaced_pod_log(name, ns, _preload_content=False, **kw).data.decode()


def cstatus(pod: dict, name: str = "main") -> dict:
    return next(c for c in pod["status"].get("containerStatuses") or [] if c["name"] == name)


def condition(pod: dict, kind: str) -> str | None:
    return next((c["status"] for c in pod["status"].get("conditions") or [] if c["type"] == kind), None)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pid_of(pod: dict, name: str = "main") -> int:
    return int(cstatus(pod, name)["containerID"].removeprefix("codemind://"))


# ---- Jobs ----------------------------------------------------------------------------------------

def job(name: str, script: str) -> dict:
    pod = python_pod(name, script)
    return {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": {"spec": pod["spec"]}}}


def test_job_runs_to_completion(kube, core, ns):
    """The Job controller sees the pod Succeeded; its status holds a loopback IP and a Completed exit."""
    from kubernetes import client

    batch = client.BatchV1Api(kube.api("dev-staging"))
    t0 = time.monotonic()
    batch.create_namespaced_job(ns, job("hello", "print('hello from a job')"))
    done = wait(lambda: (j := batch.read_namespaced_job_status("hello", ns)).status.succeeded == 1 and j,
                what="the Job to succeed")
    elapsed = time.monotonic() - t0
    assert any(c.type == "Complete" and c.status == "True" for c in done.status.conditions)
    pod = json.loads(core.list_namespaced_pod(ns, label_selector="job-name=hello", _preload_content=False).data)["items"][0]
    st = pod["status"]
    assert st["phase"] == "Succeeded" and st["hostIP"] == "127.0.0.1"
    assert re.fullmatch(r"127\.77\.\d+\.\d+", st["podIP"]) and st["podIPs"] == [{"ip": st["podIP"]}]
    term = cstatus(pod)["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed" and term["startedAt"] and term["finishedAt"]
    assert cstatus(pod)["image"] == IMAGE and cstatus(pod)["containerID"].startswith("codemind://")
    assert {c["type"]: c["status"] for c in st["conditions"]}["Initialized"] == "True"
    assert logs(core, ns, pod["metadata"]["name"]) == "hello from a job\n"
    print(f"job completed {elapsed:.2f}s after create")


def test_failing_job_reports_its_exit_code(kube, core, ns):
    from kubernetes import client

    batch = client.BatchV1Api(kube.api("dev-staging"))
    batch.create_namespaced_job(ns, job("fails", "import sys; print('about to fail'); sys.exit(3)"))
    failed = wait(lambda: (j := batch.read_namespaced_job_status("fails", ns)).status.failed and j,
                  what="the Job to fail")
    assert any(c.type == "Failed" and c.status == "True" for c in failed.status.conditions)
    pod = json.loads(core.list_namespaced_pod(ns, label_selector="job-name=fails", _preload_content=False).data)["items"][0]
    assert pod["status"]["phase"] == "Failed"
    term = cstatus(pod)["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")


def test_dr_cluster_pods_get_their_own_prefix(kube):
    from kubernetes import client

    core = client.CoreV1Api(kube.api("dr"))
    name = f"na-dr-{uuid.uuid4().hex[:5]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        wait(lambda: core.read_namespaced_service_account("default", name), what="the default ServiceAccount")
        core.create_namespaced_pod(name, python_pod("ip", "import os; print(os.environ['POD_IP'])", env=[POD_IP_ENV]))
        pod = wait(phase_is(core, name, "ip", "Succeeded"), what="the dr pod to succeed")
        assert pod["status"]["podIP"].startswith("127.78.")
        assert logs(core, name, "ip").strip() == pod["status"]["podIP"]
    finally:
        core.delete_namespace(name)


# ---- logs ----------------------------------------------------------------------------------------

def kubelet_opener(kube):
    """An HTTPS opener holding the apiserver's kubelet-client cert, and the main node's kubelet URL."""
    main = kube.clusters["main"]
    ctx = ssl.create_default_context(cafile=str(main.pki / "ca.crt"))
    ctx.load_cert_chain(str(main.pki / "apiserver-kubelet-client.crt"), str(main.pki / "apiserver-kubelet-client.key"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    return opener, f"https://127.0.0.1:{main.ports['kubelet']}"


def test_pod_logs_have_timestamps_and_follow_ends_with_the_container(kube, core, ns):
    core.create_namespaced_pod(ns, python_pod("talker", """
        import sys, time
        for i in range(3):
            print(f"line {i}")
            time.sleep(0.7)
        print("to stderr", file=sys.stderr)
    """))
    wait(phase_is(core, ns, "talker", "Running", "Succeeded"), what="the pod to run")
    resp = core.read_namespaced_pod_log("talker", ns, follow=True, timestamps=True, _preload_content=False,
                                        _request_timeout=30)
    chunks = []
    for chunk in resp.stream(1024):
        chunks.append((time.time(), chunk))
    ended = time.time()
    lines = b"".join(c for _, c in chunks).decode().splitlines()
    parsed = [TS.match(ln) for ln in lines]
    assert all(parsed), lines
    assert [m[2] for m in parsed] == ["line 0", "line 1", "line 2", "to stderr"]
    stamps = [datetime.fromisoformat(m[1][:26] + "+00:00").timestamp() for m in parsed]
    assert stamps == sorted(stamps) and 1.0 < stamps[2] - stamps[0] < 2.5  # when each line was written
    assert chunks[0][0] < stamps[-1]  # streamed while the container ran, not after
    pod = wait(phase_is(core, ns, "talker", "Succeeded"), what="the pod to succeed")
    assert ended >= datetime.fromisoformat(cstatus(pod)["state"]["terminated"]["finishedAt"]).timestamp() - 1

    assert logs(core, ns, "talker") == "line 0\nline 1\nline 2\nto stderr\n"
    assert logs(core, ns, "talker", tail_lines=1) == "to stderr\n"
    assert logs(core, ns, "talker", limit_bytes=8) == "line 0\nl"
    # sinceSeconds keeps what is newer than 0.5 to 1.5 s before the last line: that line, not the first one
    recent = logs(core, ns, "talker", since_seconds=math.ceil(time.time() - stamps[3] + 0.5))
    assert "to stderr" in recent and "line 0" not in recent
    # sinceTime and stream, which this client does not send, straight at the kubelet port
    kubelet, base = kubelet_opener(kube)
    url = f"{base}/containerLogs/{ns}/talker/main?sinceTime={parsed[2][1]}&timestamps=1"
    assert kubelet.open(url, timeout=5).read().decode().splitlines() == lines[2:]
    assert kubelet.open(f"{base}/containerLogs/{ns}/talker/main?stream=Stderr", timeout=5).read() == b"to stderr\n"
    from kubernetes import client

    with pytest.raises(client.ApiException) as e:
        logs(core, ns, "talker", previous=True)
    assert e.value.status == 400 and "previous terminated container" in e.value.body


def test_kubelet_port_requires_a_cluster_client_cert_and_checks_its_input(kube):
    main = kube.clusters["main"]
    opener, base = kubelet_opener(kube)
    with opener.open(f"{base}/healthz", timeout=5) as r:
        assert r.read() == b"ok\n"
    for path, code, text in (("/containerLogs/nope/nope/main", 404, "is not running on node"),
                             ("/containerLogs/nope/nope/main?tailLines=x", 400, "tailLines='x' is not an integer"),
                             ("/containerLogs/nope/nope/main?follow=maybe", 400, "is not a boolean"),
                             ("/pods", 404, "not served")):
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(base + path, timeout=5)
        assert e.value.code == code and text in e.value.read().decode(), path
    anonymous = ssl.create_default_context(cafile=str(main.pki / "ca.crt"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
        urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=anonymous)) \
            .open(f"{base}/healthz", timeout=5).read()


# ---- readiness, EndpointSlices, probes -----------------------------------------------------------

def test_deployment_with_http_readiness_becomes_available_with_loopback_endpoints(kube, core, ns):
    from kubernetes import client

    api = kube.api("dev-staging")
    apps, discovery = client.AppsV1Api(api), client.DiscoveryV1Api(api)
    labels = {"app": "web"}
    container = {"name": "web", "image": IMAGE, "env": [POD_IP_ENV],
                 "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}
    t0 = time.monotonic()
    apps.create_namespaced_deployment(ns, {"metadata": {"name": "web"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": {"terminationGracePeriodSeconds": 2,
                                                              "containers": [container]}}}})
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "selector": labels, "ports": [{"port": 80, "targetPort": "http"}]}})
    dep = wait(lambda: (d := apps.read_namespaced_deployment_status("web", ns)).status.available_replicas == 2 and d,
               what="the Deployment to be Available")
    available_s = time.monotonic() - t0
    assert any(c.type == "Available" and c.status == "True" for c in dep.status.conditions)
    pods = json.loads(core.list_namespaced_pod(ns, label_selector="app=web", _preload_content=False).data)["items"]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.77.") for ip in ips)
    assert all(condition(p, "Ready") == "True" and cstatus(p, "web")["ready"] for p in pods)

    # The EndpointSlice controller publishes both pod IPs, but the apiserver's EndpointSlice validation refuses
    # any address in 127/8, so the slice stays empty (kube_runtime computes endpoints from ready pods instead).
    # Should that ever change, this fails, and the slice assertion below can replace it.
    def refused() -> bool:
        events = core.list_namespaced_event(ns, field_selector="involvedObject.kind=Service,involvedObject.name=web").items
        return any(e.reason == "FailedToUpdateEndpointSlices" and "may not be in the loopback range" in e.message
                   and all(f'"{ip}"' in e.message for ip in ips) for e in events)

    assert wait(refused, what="the EndpointSlice controller to publish both pod IPs")
    slices = discovery.list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name=web").items
    assert not {a for sl in slices for e in sl.endpoints or [] for a in e.addresses} & ips
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for ip in ips:
        with opener.open(f"http://{ip}:8080/", timeout=5) as r:
            assert r.status == 200
    print(f"two-replica Deployment Available {available_s:.2f}s after create")


def test_failing_readiness_keeps_ready_false_and_liveness_restarts(core, ns):
    core.create_namespaced_pod(ns, python_pod(
        "unready", "import time; time.sleep(600)",
        readinessProbe={"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 1}))
    core.create_namespaced_pod(ns, python_pod(
        "unlive", "print('up'); import time; time.sleep(600)", restart="Always",
        livenessProbe={"exec": {"command": ["python", "-c", "raise SystemExit(1)"]}, "periodSeconds": 1,
                       "failureThreshold": 2}))
    core.create_namespaced_pod(ns, python_pod(
        "slowstart", "import os, socket, time; time.sleep(2); s = socket.socket(); s.bind((os.environ['POD_IP'], 8080)); "
                     "s.listen(); time.sleep(600)", env=[POD_IP_ENV],
        startupProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 10},
        readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1}))
    early = wait(phase_is(core, ns, "slowstart", "Running"), what="the slow starter to run")
    assert cstatus(early, "main")["started"] is False and condition(early, "Ready") == "False"
    late = wait(lambda: condition(p := pod_json(core, ns, "slowstart"), "Ready") == "True" and p, what="startup, then ready")
    assert cstatus(late)["started"] is True and cstatus(late)["restartCount"] == 0
    wait(phase_is(core, ns, "unready", "Running"), what="the unready pod to run")
    restarted = wait(lambda: cstatus(p := pod_json(core, ns, "unlive"))["restartCount"] >= 1 and p, timeout=40,
                     what="the liveness probe to restart the container")
    last = cstatus(restarted)["lastState"]["terminated"]
    assert last["reason"] == "Error" and last["exitCode"] in (137, 143)
    assert restarted["status"]["phase"] == "Running"
    assert "up\n" in logs(core, ns, "unlive", previous=True)
    pod = pod_json(core, ns, "unready")
    assert pod["status"]["phase"] == "Running" and "running" in cstatus(pod)["state"]
    assert cstatus(pod)["ready"] is False
    assert condition(pod, "Ready") == "False" and condition(pod, "ContainersReady") == "False"


# ---- config, env, volumes ------------------------------------------------------------------------

SEE_EVERYTHING = """
    import json, os
    from kubernetes import client, config
    def read(p):
        try:
            return open(p).read()
        except OSError as e:
            return f"ERR {e}"
    try:
        open("/etc/codemind/secret/new", "w")
        ro = "writable"
    except OSError as e:
        ro = e.strerror
    config.load_incluster_config()
    print(json.dumps({
        "env": dict(os.environ), "cwd": os.getcwd(), "readonly": ro,
        "version": client.VersionApi().get_code().git_version,
        "home_yaml": read("/opt/dagster/dagster_home/dagster.yaml"),
        "home_listing": sorted(os.listdir("/opt/dagster/dagster_home")),
        "password": read("/etc/codemind/secret/password"),
        "password_mode": oct(os.stat("/etc/codemind/secret/password").st_mode & 0o777),
        "token": read("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        "sa_namespace": read("/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
        "labels": read("/etc/podinfo/labels"),
    }))
"""


def test_configmap_secret_env_and_downward_values_reach_the_process(kube, core, ns):
    opt_dagster_existed = Path("/opt/dagster").exists()
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {
        "dagster.yaml": "run_launcher: k8s\n", "other.txt": "not mounted", "GREETING": "hello", "MODE": "dev"}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "sec"}, "stringData": {"password": "s3cret", "TOKEN": "t0k"}})
    pod = python_pod("see", SEE_EVERYTHING, workingDir="/opt/dagster/dagster_home", env=[
        POD_IP_ENV,
        {"name": "NAME", "value": "world"},
        {"name": "MESSAGE", "value": "$(GREETING) $(NAME) $$(NAME) $(UNDEFINED)"},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "MISSING_OK", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": True}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
    ], envFrom=[{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"}],
        volumeMounts=[
        {"name": "cfg", "mountPath": "/opt/dagster/dagster_home/dagster.yaml", "subPath": "dagster.yaml"},
        {"name": "sec", "mountPath": "/etc/codemind/secret"},
        {"name": "podinfo", "mountPath": "/etc/podinfo"}])
    pod["spec"]["volumes"] = [
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "sec", "secret": {"secretName": "sec", "items": [{"key": "password", "path": "password"}],
                                   "defaultMode": 0o400}},
        {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]
    core.create_namespaced_pod(ns, pod)
    done = wait(phase_is(core, ns, "see", "Succeeded", "Failed"), timeout=60, what="the pod to finish")
    out = logs(core, ns, "see")
    assert done["status"]["phase"] == "Succeeded", out
    seen = json.loads(out)
    env = seen["env"]
    assert env["MESSAGE"] == "hello world $(NAME) $(UNDEFINED)"
    assert (env["FROM_CM"], env["FROM_SECRET"], env["GREETING"], env["S_TOKEN"]) == ("dev", "s3cret", "hello", "t0k")
    assert "MISSING_OK" not in env
    uid = done["metadata"]["uid"]
    assert (env["POD_NAME"], env["POD_NS"], env["POD_UID"], env["APP"]) == ("see", ns, uid, "see")
    assert (env["NODE"], env["HOST_IP"], env["SA"]) == ("codemind-main-node", "127.0.0.1", "default")
    assert env["POD_IP"] == done["status"]["podIP"] and env["HOSTNAME"] == "see"
    port = str(kube.clusters["main"].ports["apiserver"])
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", port)
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert "PYTHONUNBUFFERED" not in env and "CODEMIND_HOME" not in env  # the agent's own env stays out
    assert seen["version"].startswith("v1.36")  # in-cluster config: token, CA and service env all work
    assert seen["cwd"] == "/opt/dagster/dagster_home"
    assert seen["home_yaml"] == "run_launcher: k8s\n" and seen["home_listing"] == ["dagster.yaml"]
    assert (seen["password"], seen["password_mode"], seen["readonly"]) == ("s3cret", "0o400", "Read-only file system")
    assert seen["sa_namespace"] == ns and seen["token"].count(".") == 2
    assert seen["labels"] == 'app="see"'
    if not opt_dagster_existed:
        assert not Path("/opt/dagster").exists()  # the mounts were the pod's alone
    assert not Path("/etc/codemind").exists()


def test_init_containers_run_in_order_and_on_failure_restarts(core, ns):
    pod = python_pod("steps", """
        import os, sys
        if not os.path.exists("/mnt/work/tried"):
            open("/mnt/work/tried", "w").close()
            print("first try fails")
            sys.exit(1)
        print(open("/mnt/work/log").read(), end="")
    """, restart="OnFailure", volumeMounts=[{"name": "work", "mountPath": "/mnt/work"}])
    pod["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    pod["spec"]["initContainers"] = [
        {"name": f"init{i}", "image": IMAGE, "volumeMounts": [{"name": "work", "mountPath": "/mnt/work"}],
         "command": ["python", "-c", f"open('/mnt/work/log', 'a').write('init{i}\\n')"]} for i in (1, 2)]
    core.create_namespaced_pod(ns, pod)
    done = wait(phase_is(core, ns, "steps", "Succeeded", "Failed"), timeout=40, what="the pod to finish")
    assert done["status"]["phase"] == "Succeeded"
    assert logs(core, ns, "steps") == "init1\ninit2\n"
    assert logs(core, ns, "steps", previous=True) == "first try fails\n"
    assert cstatus(done)["restartCount"] == 1
    inits = done["status"]["initContainerStatuses"]
    assert [(c["name"], c["state"]["terminated"]["reason"]) for c in inits] == [("init1", "Completed"), ("init2", "Completed")]


# ---- network policy ------------------------------------------------------------------------------

def test_deny_all_egress_network_policy_is_enforced_by_the_kernel(kube, core, ns):
    from kubernetes import client

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept() -> None:
        try:
            while True:
                accepted.append(listener.accept()[0])
        except OSError:
            pass  # closed at the end of the test

    threading.Thread(target=accept, daemon=True).start()
    client.NetworkingV1Api(kube.api("dev-staging")).create_namespaced_network_policy(ns, {
        "metadata": {"name": "deny-egress"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["locked"]}]},
            "policyTypes": ["Egress"]}})
    script = """
        import os, socket, time
        server = socket.socket()
        server.bind((os.environ["POD_IP"], 8080))
        server.listen()
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect(("127.0.0.1", int(os.environ["TARGET"])))
            print("connected")
        except OSError as e:
            print("blocked:", e)
        time.sleep(600)
    """
    for name in ("free", "locked"):
        core.create_namespaced_pod(ns, python_pod(
            name, script, env=[POD_IP_ENV, {"name": "TARGET", "value": str(listener.getsockname()[1])}],
            readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1}))
    for name in ("free", "locked"):
        wait(lambda n=name: condition(pod_json(core, ns, n), "Ready") == "True", what=f"pod {name} to be Ready")
        wait(lambda n=name: logs(core, ns, n), what=f"pod {name} to try")
    assert logs(core, ns, "free") == "connected\n"
    assert logs(core, ns, "locked").startswith("blocked: [Errno 111] Connection refused")
    assert len(accepted) == 1
    listener.close()


def test_args_alone_are_the_command_as_with_an_image_without_entrypoint(core, ns):
    """dagster-k8s run and step Jobs set only args (`dagster api execute_run ...`); they must run as written."""
    core.create_namespaced_pod(ns, {"metadata": {"name": "argsonly"}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": IMAGE, "args": ["python", "-c", "import sys; print('args ran', sys.argv[1:])", "x"]}]}})
    wait(phase_is(core, ns, "argsonly", "Succeeded"), what="the args-only pod to succeed")
    assert logs(core, ns, "argsonly") == "args ran ['x']\n"


def test_security_context_runs_the_process_as_its_user_without_privileges(core, ns):
    """runAsUser/runAsGroup/fsGroup become the process's ids; allowPrivilegeEscalation: false sets no_new_privs."""
    script = """
        import os
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        open("/scratch/w", "w").write("ok")
        print(os.getuid(), os.getgid(), sorted(os.getgroups()), status["NoNewPrivs"].strip(), status["CapEff"].strip())
        try:
            os.chown("/scratch/w", 0, 0)
        except PermissionError:
            print("chown refused")
        try:
            print(sorted(os.listdir("/root")))
        except OSError:
            print("/root unlisted")
    """
    pod = python_pod("asuser", script, securityContext={"allowPrivilegeEscalation": False,
                                                        "capabilities": {"drop": ["ALL"]}},
                     volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])
    pod["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10002,
                                      "fsGroup": 10003}
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    core.create_namespaced_pod(ns, pod)
    wait(phase_is(core, ns, "asuser", "Succeeded"), what="the runAsUser pod to succeed")
    # Where /root is closed (mode 0700, as here), the pod sees in it only the image's interpreter, not root's files.
    home = sorted({Path(p).parts[2] for p in default_image_map()["codemind/"]["paths"] if Path(p).parts[1:2] == ("root",)})
    out = logs(core, ns, "asuser").splitlines()
    assert out[:2] == ["10001 10002 [10002, 10003] 1 0000000000000000", "chown refused"]
    if os.stat("/root").st_mode & 0o001 == 0:
        assert out[2] == str(home)


def test_run_as_non_root_without_a_user_is_refused(core, ns):
    """The mapped images run as root, so runAsNonRoot without runAsUser must not start, as with a root image."""
    pod = python_pod("rootish", "print('ran')")
    pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    core.create_namespaced_pod(ns, pod)
    st = wait(lambda: cstatus(p := pod_json(core, ns, "rootish"))["state"].get("waiting", {}).get("reason")
              == "CreateContainerConfigError" and cstatus(p), what="CreateContainerConfigError")
    assert "runAsNonRoot and image will run as root" in st["state"]["waiting"]["message"]
    assert pod_json(core, ns, "rootish")["status"]["phase"] == "Pending"


# ---- bad input -----------------------------------------------------------------------------------

def test_unmapped_image_and_missing_command_are_clear_errors(core, ns):
    core.create_namespaced_pod(ns, {"metadata": {"name": "busybox"}, "spec": {"containers": [
        {"name": "main", "image": "busybox:1.36", "command": ["sh", "-c", "echo hi"]}]}})
    core.create_namespaced_pod(ns, {"metadata": {"name": "nocmd"}, "spec": {"containers": [
        {"name": "main", "image": IMAGE}]}})
    core.create_namespaced_pod(ns, python_pod("nobin", "", command=["no-such-binary", "x"]))

    def waiting(name):
        return lambda: (p := pod_json(core, ns, name)).get("status", {}).get("containerStatuses") and \
            cstatus(p)["state"].get("waiting", {}).get("reason") not in (None, "ContainerCreating") and cstatus(p)

    pulled = wait(waiting("busybox"), what="ErrImagePull")["state"]["waiting"]
    assert pulled["reason"] == "ErrImagePull"
    assert '"busybox:1.36"' in pulled["message"] and "codemind/*" in pulled["message"] and "--image-map" in pulled["message"]
    assert pod_json(core, ns, "busybox")["status"]["phase"] == "Pending"
    nocmd = wait(waiting("nocmd"), what="CreateContainerError")["state"]["waiting"]
    assert nocmd["reason"] == "CreateContainerError" and "spec.command" in nocmd["message"]
    failed = wait(phase_is(core, ns, "nobin", "Failed"), what="the pod with a missing binary to fail")
    term = cstatus(failed)["state"]["terminated"]
    assert (term["reason"], term["exitCode"]) == ("StartError", 128)
    assert 'exec: "no-such-binary": executable file not found in $PATH' in term["message"]


def test_missing_configmap_waits_then_starts_when_it_appears(core, ns):
    pod = python_pod("later", "print(open('/etc/late/k').read())", volumeMounts=[{"name": "v", "mountPath": "/etc/late"}])
    pod["spec"]["volumes"] = [{"name": "v", "configMap": {"name": "late"}}]
    core.create_namespaced_pod(ns, pod)
    st = wait(lambda: "not found" in cstatus(pod_json(core, ns, "later"))["state"]["waiting"].get("message", "")
              and cstatus(pod_json(core, ns, "later")), what="a ContainerCreating message")
    assert 'configMap "late" not found' in st["state"]["waiting"]["message"]
    core.create_namespaced_config_map(ns, {"metadata": {"name": "late"}, "data": {"k": "v"}})
    wait(phase_is(core, ns, "later", "Succeeded"), what="the pod to run once the ConfigMap exists")
    assert logs(core, ns, "later") == "v\n"


def test_bad_agent_arguments_are_refused(tmp_path):
    base = [sys.executable, "-m", "devcluster.nodeagent", "--kubeconfig", "k", "--admin-kubeconfig", "a",
            "--node-name", "n", "--kubelet-port", "1", "--tls-cert", "c", "--tls-key", "k", "--client-ca", "ca",
            "--apiserver", "https://127.0.0.1:1", "--state-dir", str(tmp_path)]
    for extra, text in ((["--pod-ip-prefix", "10.1"], "two octets inside 127/8"),
                        (["--pod-ip-prefix", "127.77", "--image-map", "{bad"], "not JSON"),
                        (["--pod-ip-prefix", "127.77", "--image-map", '{"codemind/": {"entrypoint": 1}}'],
                         '"env": {"NAME": "value"}')):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=30, check=False)
        assert p.returncode == 2 and text in p.stderr, p.stderr


def test_pod_ips_are_unique_across_agents_sharing_a_prefix(tmp_path):
    """Two agents with one prefix (two test sessions at once) never hand out the same IP; a freed one returns."""
    a, b = podrun.IPPool("127.77", tmp_path), podrun.IPPool("127.77", tmp_path)
    first = [a.take() for _ in range(3)]
    second = [b.take() for _ in range(3)]
    assert not set(first) & set(second) and len(set(first)) == 3
    assert all(0 < int(ip.rsplit(".", 1)[1]) < 255 for ip in first + second)
    assert b.take(first[0]) != first[0]  # held by the other agent: not even when asked for by name
    a.free(first[0])
    assert b.take(first[0]) == first[0]


def test_expansion_follows_kubernetes_rules():
    env = {"A": "x", "B": "$(A)"}
    assert podrun.expand("$(A)-$(B)-$$(A)-$(C)-$-$(A", env) == "x-$(A)-$(A)-$(C)-$-$(A"
    assert podrun.expand("$$$(A)", env) == "$x"


# ---- deletion and the node itself ----------------------------------------------------------------

def test_deleting_a_pod_stops_its_whole_process_tree(core, ns):
    core.create_namespaced_pod(ns, python_pod("sleeper", """
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["setsid", "sleep", "600"])
        print(child.pid)
        time.sleep(600)
    """))
    pod = wait(phase_is(core, ns, "sleeper", "Running"), what="the pod to run")
    main = pid_of(pod)
    child = int(wait(lambda: logs(core, ns, "sleeper").strip(), what="the child pid"))
    assert alive(main) and alive(child)
    t0 = time.monotonic()
    core.delete_namespaced_pod("sleeper", ns)
    wait(lambda: core.list_namespaced_pod(ns, field_selector="metadata.name=sleeper").items == [], timeout=30,
         what="the pod object to go")
    took = time.monotonic() - t0
    assert not alive(main) and not alive(child)
    assert took >= 1.5  # SIGTERM was ignored: SIGKILL came after the 2 s grace period


def test_a_force_deleted_pod_is_cleaned_up_too(core, ns):
    """A pod removed from the apiserver at once (grace 0, like `kubectl delete --force`) still has its process stopped."""
    core.create_namespaced_pod(ns, python_pod("forced", "import time; time.sleep(600)"))
    pid = pid_of(wait(phase_is(core, ns, "forced", "Running"), what="the pod to run"))
    core.delete_namespaced_pod("forced", ns, body={"gracePeriodSeconds": 0})
    assert core.list_namespaced_pod(ns, field_selector="metadata.name=forced").items == []
    wait(lambda: not alive(pid), timeout=10, what="the process to stop")


def test_node_is_ready_and_renews_its_lease(kube):
    from kubernetes import client

    api = kube.api("dev-staging")
    node = client.CoreV1Api(api).read_node("codemind-main-node")
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert node.status.daemon_endpoints.kubelet_endpoint.port == kube.clusters["main"].ports["kubelet"]
    assert {(a.type, a.address) for a in node.status.addresses} == {("InternalIP", "127.0.0.1"),
                                                                     ("Hostname", "codemind-main-node")}
    assert node.status.allocatable["pods"] == "110" and node.status.node_info.kubelet_version == "v1.36.3"
    coord = client.CoordinationV1Api(api)
    first = coord.read_namespaced_lease("codemind-main-node", "kube-node-lease").spec
    assert first.holder_identity == "codemind-main-node"
    assert (datetime.now(UTC) - first.renew_time).total_seconds() < 15
    wait(lambda: coord.read_namespaced_lease("codemind-main-node", "kube-node-lease").spec.renew_time != first.renew_time,
         timeout=15, every=0.5, what="the Lease to be renewed")
