"""The node agent of a devcluster node: registers the Node, renews its Lease, runs the pods bound to it as local
process trees (devcluster.podrun) and serves their logs on the kubelet port, as a kubelet would."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import ssl
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from devcluster import podrun
from devcluster.build import KUBERNETES_VERSION

LEASE_NAMESPACE = "kube-node-lease"
HEARTBEAT_S = 10.0
SHUTDOWN_GRACE_S = 2.0  # cluster.stop SIGKILLs the agent 5 s after SIGTERM: its pods must be gone by then
CGROUP_PIDS = Path("/sys/fs/cgroup/pids")


_LOG_LOCK = threading.Lock()


def log(msg: str) -> None:
    with _LOG_LOCK:  # one line per message, even from many pod threads
        sys.stdout.write(f"{datetime.now().astimezone().strftime('%H:%M:%S.%f')[:-3]} {msg}\n")
        sys.stdout.flush()


def micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def default_image_map() -> dict[str, dict]:
    """`codemind/*` images run with this project's environment: its venv's bin first on PATH."""
    path = [os.path.dirname(sys.executable)] + (os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(":")
    # What the image holds: a non-root container user sees these even under a directory closed to it (/root).
    files = list(dict.fromkeys(os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)))
    return {"codemind/": {"env": {"PATH": ":".join(dict.fromkeys(p for p in path if p))}, "paths": files}}


def image_map_arg(text: str) -> dict[str, dict]:
    try:
        m = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    ok = isinstance(m, dict) and m and all(
        isinstance(k, str) and k and isinstance(v, dict) and set(v) <= {"env", "workingDir", "paths"}
        and all(isinstance(x, str) for x in (v.get("env") or {}).values())
        and all(isinstance(x, str) and os.path.isabs(x) for x in v.get("paths") or []) for k, v in m.items())
    if not ok:
        raise argparse.ArgumentTypeError('expected {"<repository prefix>": {"env": {"NAME": "value"}, '
                                         '"workingDir": "/path", "paths": ["/abs/path"]}, ...}')
    return m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devcluster.nodeagent", description=__doc__)
    for name, help_ in (("--kubeconfig", "kubeconfig of the node identity (system:node:NAME)"),
                        ("--admin-kubeconfig", "kubeconfig allowed to read NetworkPolicies"),
                        ("--node-name", "the Node to register"), ("--pod-ip-prefix", "two octets, e.g. 127.77"),
                        ("--tls-cert", "kubelet serving certificate"), ("--tls-key", "its key"),
                        ("--client-ca", "CA that signs the apiserver's kubelet-client certificate"),
                        ("--apiserver", "https://127.0.0.1:PORT"), ("--state-dir", "volumes, logs, scratch")):
        p.add_argument(name, required=True, help=help_)
    p.add_argument("--kubelet-port", type=int, required=True)
    p.add_argument("--image-map", type=image_map_arg, default=None,
                   help="JSON: image repository prefix -> {env, workingDir} (default: codemind/ -> this venv)")
    a = p.parse_args(argv)
    try:
        podrun.IPPool(a.pod_ip_prefix)
    except ValueError as e:
        p.error(str(e))
    a.image_map = a.image_map or default_image_map()
    return a


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


class Agent:
    """One node: its API clients, the Node and Lease, the pod watch, the kubelet HTTPS endpoint."""

    def __init__(self, a: argparse.Namespace):
        from kubernetes import client, config

        def api(kubeconfig: str) -> client.ApiClient:
            cfg = client.Configuration()
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            cfg.connection_pool_maxsize = 32  # one pod's threads may patch, read and probe at once
            return client.ApiClient(cfg)

        self.a, self.name = a, a.node_name
        node = api(a.kubeconfig)
        self.core, self.coord = client.CoreV1Api(node), client.CoordinationV1Api(node)
        self.netpol = client.NetworkingV1Api(api(a.admin_kubeconfig))
        self.started = podrun.now()
        mem_kib = re.search(r"MemTotal:\s+(\d+)", _read("/proc/meminfo"))[1]
        self.capacity = {"cpu": str(os.cpu_count() or 1), "pods": "110", "memory": f"{mem_kib}Ki",
                         "ephemeral-storage": str(shutil.disk_usage(a.state_dir if os.path.isdir(a.state_dir)
                                                                    else "/").total)}
        self.node_uid = ""
        self.ctx = podrun.NodeContext(
            name=self.name, core=self.core, list_network_policies=self._network_policies,
            state_dir=Path(a.state_dir), apiserver_port=urlsplit(a.apiserver).port or 443, image_map=a.image_map,
            ips=podrun.IPPool(a.pod_ip_prefix), cgroup_root=self._cgroup_root(), log=log,
            allocatable=self.capacity)
        self.pods: dict[str, podrun.PodRunner] = {}
        self.finished: set[str] = set()  # uids deleted by us whose objects still linger on finalizers
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def _cgroup_root(self) -> Path | None:
        # Keyed by the state dir, so two clusters (or two test sessions) never touch each other's processes.
        root = CGROUP_PIDS / f"codemind-{hashlib.sha1(str(Path(self.a.state_dir).resolve()).encode()).hexdigest()[:12]}"
        try:
            podrun.cgroup_remove(root)  # whatever a previous agent on this state dir left running
            root.mkdir(parents=True, exist_ok=True)
            return root
        except OSError as e:
            log(f"no pids cgroup ({e}): stray processes are found by process group only")
            return None

    # ---- the Node and its Lease ----------------------------------------------------------------------

    def _node_status(self) -> dict:
        beat = podrun.now()
        conds = [("Ready", "True", "KubeletReady", "codemind node agent is posting ready status"),
                 ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                 ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                 ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure")]
        os_image = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read("/etc/os-release"), re.MULTILINE)
        return {
            "capacity": self.capacity, "allocatable": self.capacity,
            "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": beat,
                            "lastTransitionTime": self.started} for t, s, r, m in conds],
            "addresses": [{"type": "InternalIP", "address": podrun.HOST_IP}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.a.kubelet_port}},
            "nodeInfo": {"machineID": _read("/etc/machine-id"), "systemUUID": _read("/etc/machine-id"),
                         "bootID": _read("/proc/sys/kernel/random/boot_id"), "kernelVersion": platform.release(),
                         "osImage": os_image[1] if os_image else "Linux", "containerRuntimeVersion": "codemind://0.1",
                         "kubeletVersion": KUBERNETES_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                    platform.machine())},
        }

    def register(self) -> bool:
        """Creates the Node (or takes it over) with a Ready status; retries until the apiserver answers."""
        from kubernetes.client import ApiException

        arch = self._node_status()["nodeInfo"]["architecture"]
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": {
            "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch}},
            "status": self._node_status()}
        while not self.stopping.is_set():
            try:
                try:
                    podrun.raw(self.core.create_node, body)
                    log(f"registered node {self.name}")
                except ApiException as e:
                    if e.status != 409:
                        raise
                    log(f"node {self.name} exists: taking it over")
                self.node_uid = self._patch_node_status()["metadata"]["uid"]
                self._renew_lease()
                return True
            except Exception as e:  # noqa: BLE001 - any failure: retry
                log(f"registering node {self.name} failed, retrying: {_brief(e)}")
                self.stopping.wait(1)
        return False

    def _patch_node_status(self) -> dict:
        return podrun.raw(self.core.patch_node_status, self.name, {"status": self._node_status()},
                          _content_type="application/strategic-merge-patch+json")

    def _renew_lease(self) -> None:
        from kubernetes.client import ApiException

        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        try:
            podrun.raw(self.coord.patch_namespaced_lease, self.name, LEASE_NAMESPACE, {"spec": spec},
                       _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise
            podrun.raw(self.coord.create_namespaced_lease, LEASE_NAMESPACE, {
                "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}]},
                "spec": spec})

    def _heartbeat(self) -> None:
        """Renews the Lease and the Ready heartbeat, so the node lifecycle controller never sees a silent node."""
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self._renew_lease()
                self._patch_node_status()
            except Exception as e:  # noqa: BLE001 - keep beating through apiserver hiccups
                log(f"heartbeat failed: {_brief(e)}")

    def _network_policies(self, namespace: str) -> list[dict]:
        return podrun.raw(self.netpol.list_namespaced_network_policy, namespace)["items"]

    # ---- pods ----------------------------------------------------------------------------------------

    def _watch(self) -> None:
        """List, then watch from that resourceVersion; any error or expiry (410) means a fresh relist."""
        from kubernetes.watch.watch import iter_resp_lines

        selector = f"spec.nodeName={self.name}"
        while not self.stopping.is_set():
            try:
                listed = podrun.raw(self.core.list_pod_for_all_namespaces, field_selector=selector)
                self._reconcile(listed["items"])
                rv = listed["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    resp = self.core.list_pod_for_all_namespaces(
                        field_selector=selector, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                        timeout_seconds=240, _preload_content=False, _request_timeout=(10, 270))
                    try:
                        for line in iter_resp_lines(resp):
                            ev = json.loads(line)
                            if ev["type"] == "ERROR":
                                raise RuntimeError(f"watch error: {ev['object'].get('message')}")
                            rv = ev["object"]["metadata"]["resourceVersion"]
                            if ev["type"] == "DELETED":
                                self._gone(ev["object"]["metadata"]["uid"])
                            elif ev["type"] in ("ADDED", "MODIFIED"):
                                self._apply(ev["object"])
                    finally:
                        resp.release_conn()
            except Exception as e:  # noqa: BLE001 - any failure: relist
                if not self.stopping.is_set():
                    log(f"pod watch: {_brief(e)}; relisting")
                    self.stopping.wait(1)

    def _reconcile(self, pods: list[dict]) -> None:
        seen = {p["metadata"]["uid"] for p in pods}
        for p in pods:
            self._apply(p)
        with self.lock:
            self.finished &= seen
            gone = [uid for uid in self.pods if uid not in seen]
        for uid in gone:
            self._gone(uid)

    def _apply(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            if uid in self.finished or self.stopping.is_set():
                return
            runner = self.pods.get(uid)
            if runner is None:
                runner = self.pods[uid] = podrun.PodRunner(self.ctx, pod, self._forget)
                runner.start()
                return
        runner.update(pod)

    def _gone(self, uid: str) -> None:
        with self.lock:
            self.finished.discard(uid)
            runner = self.pods.get(uid)
        if runner:
            runner.log("no longer on the apiserver: stopping it")
            runner.stop("vanish", SHUTDOWN_GRACE_S)

    def _forget(self, runner: podrun.PodRunner) -> None:
        with self.lock:
            if self.pods.get(runner.uid) is runner:
                del self.pods[runner.uid]
            if runner.stop_mode == "delete":
                self.finished.add(runner.uid)

    def log_source(self, namespace: str, pod: str, container: str, previous: bool):
        with self.lock:
            runners = [r for r in self.pods.values() if r.ns == namespace and r.name == pod]
        if not runners:
            raise LookupError(404, f'pod "{namespace}/{pod}" is not running on node {self.name}')
        return runners[-1].log_source(container, previous)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        if not self.register():
            return 0
        server = self._serve()
        for target in (self._heartbeat, self._watch):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        log(f"node {self.name} ready: kubelet API on 127.0.0.1:{self.a.kubelet_port}, pod IPs {self.a.pod_ip_prefix}.x.y")
        while not self.stopping.wait(1):
            pass
        self.shutdown()
        server.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stops every pod process this agent started (the pod objects stay, as with a kubelet restart)."""
        with self.lock:
            runners = list(self.pods.values())
        log(f"shutting down: stopping {len(runners)} pod(s)")
        for r in runners:
            r.stop("shutdown", SHUTDOWN_GRACE_S)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S + 1.5
        for r in runners:
            r.thread.join(max(0.0, deadline - time.monotonic()))
        if self.ctx.cgroup_root:
            podrun.cgroup_remove(self.ctx.cgroup_root)
        log("stopped")

    def _serve(self) -> ThreadingHTTPServer:
        """The kubelet port: HTTPS with the kubelet cert, client certs signed by the cluster CA required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.a.tls_cert, self.a.tls_key)
        ctx.load_verify_locations(self.a.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        handler = type("Handler", (KubeletHandler,), {"agent": self})
        server = _Server((podrun.HOST_IP, self.a.kubelet_port), handler)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
        return server


def _brief(e: Exception) -> str:
    status = getattr(e, "status", None)
    return f"{status} {getattr(e, 'reason', '')}".strip() if status else f"{type(e).__name__}: {e}"


# ---- the kubelet API: /healthz and /containerLogs --------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        log(f"kubelet API: connection from {client_address[0]} failed: {_brief(sys.exc_info()[1])}")


def _bool(q: dict, k: str) -> bool:
    v = q.get(k, [""])[-1]
    if v.lower() in ("", "0", "f", "false"):
        return False
    if v.lower() in ("1", "t", "true"):
        return True
    raise ValueError(f"{k}={v!r} is not a boolean")


def _int(q: dict, k: str, minimum: int) -> int | None:
    if k not in q:
        return None
    try:
        n = int(q[k][-1])
    except ValueError:
        raise ValueError(f"{k}={q[k][-1]!r} is not an integer") from None
    if n < minimum:
        raise ValueError(f"{k} must be >= {minimum}, got {n}")
    return n


def log_options(query: str) -> dict:
    """The kubelet's containerLogs query parameters; ValueError names a bad one."""
    q = parse_qs(query, keep_blank_values=True)
    since = None
    if "sinceTime" in q:
        v = q["sinceTime"][-1]
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", v)
        if not m:
            raise ValueError(f"sinceTime={v!r} is not RFC3339")
        t = datetime.fromisoformat(m[1] + (m[2] or "")[:7] + (m[3].replace("Z", "+00:00")))
        since = int(t.timestamp()) * 10**9 + t.microsecond * 1000
    seconds = _int(q, "sinceSeconds", 1)
    if seconds is not None:
        since = max(since or 0, time.time_ns() - seconds * 10**9)
    stream = q.get("stream", ["All"])[-1]
    if stream not in ("All", "Stdout", "Stderr"):
        raise ValueError(f"stream={stream!r}: expected All, Stdout or Stderr")
    return {"timestamps": _bool(q, "timestamps"), "follow": _bool(q, "follow"), "previous": _bool(q, "previous"),
            "tail": _int(q, "tailLines", 0), "limit": _int(q, "limitBytes", 1),
            "since": podrun.ts_nano(since).encode() if since is not None else None,
            "stream": None if stream == "All" else stream.lower().encode()}


def read_log(path: Path, done: threading.Event, o: dict):
    """Yields one container run's log as the kubelet serves it; with follow, until that run has exited."""
    budget = o["limit"]

    def render(line: bytes) -> bytes:
        parts = line.rstrip(b"\n").split(b" ", 3)
        if len(parts) != 4 or (o["since"] and parts[0] < o["since"]) or (o["stream"] and parts[1] != o["stream"]):
            return b""
        return (parts[0] + b" " if o["timestamps"] else b"") + parts[3] + b"\n"

    def capped(out: bytes) -> bytes:
        nonlocal budget
        if budget is not None:
            out, budget = out[:budget], budget - len(out[:budget])
        return out

    with open(path, "rb") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is left for the follow loop
        f.seek(end)
        lines = [r for r in map(render, data[:end].splitlines(keepends=True)) if r]
        if o["tail"] is not None:
            lines = lines[len(lines) - o["tail"]:] if o["tail"] < len(lines) else lines
        if lines:
            yield capped(b"".join(lines))
        finished = False
        while o["follow"] and budget != 0:
            line = f.readline()
            if line.endswith(b"\n"):
                if r := render(line):
                    yield capped(r)
                continue
            f.seek(-len(line), os.SEEK_CUR)
            if finished:
                return
            finished = done.is_set()  # one more pass after the run ended drains what it wrote last
            if not finished:
                time.sleep(0.1)


class KubeletHandler(BaseHTTPRequestHandler):
    """What the apiserver proxies `pods/log` to; other kubelet paths answer 404."""

    protocol_version = "HTTP/1.1"
    timeout = 30
    agent: Agent

    def setup(self) -> None:
        super().setup()
        self.request.do_handshake()  # here, in the handler thread, not in the accept loop

    def log_message(self, fmt: str, *args) -> None:
        log(f"kubelet API: {fmt % args}")

    def _reply(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.rstrip("/") == "/healthz":
            return self._reply(200, "ok")
        m = re.fullmatch(r"/containerLogs/([^/]+)/([^/]+)/([^/]+)/?", url.path)
        if not m:
            return self._reply(404, f"{url.path} is not served by the codemind node agent "
                                    "(only /containerLogs/NS/POD/CONTAINER and /healthz)")
        try:
            opts = log_options(url.query)
            path, done = self.agent.log_source(*m.groups(), opts["previous"])
        except ValueError as e:
            return self._reply(400, str(e))
        except LookupError as e:
            return self._reply(*e.args)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in read_log(path, done, opts):
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            pass  # the client went away mid-stream


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    agent = Agent(a)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stopping.set())
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
