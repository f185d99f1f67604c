"""Starts and stops local control planes (etcd, apiserver, controller-manager, scheduler, node agent)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devcluster import build, certs

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
# The shared folder sits beside the repository (../shared); CODEMIND_SHARED points elsewhere.
SHARED_K8S = Path(os.environ.get("CODEMIND_SHARED") or Path(__file__).resolve().parent.parent.parent / "shared") / "k8s"

# Two clusters side by side: dev, staging and production on one, disaster recovery on the other.
CLUSTERS: dict[str, tuple[str, ...]] = {"main": ("dev-staging", "production"), "dr": ("dr",)}
POD_IP_PREFIX = {"main": "127.77", "dr": "127.78"}


def kube_dir(home: Path) -> Path:
    return home / "kube"


def kubeconfig_path(home: Path) -> Path:
    """The kubeconfig holding every context of every cluster started under home."""
    return kube_dir(home) / "config"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"[k8s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Cluster:
    """One control plane with one node, all on 127.0.0.1, with its files under `root`."""

    name: str
    root: Path
    contexts: tuple[str, ...]
    pod_ip_prefix: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def node_name(self) -> str:
        return f"codemind-{self.name}-node"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def admin_kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, bins: Path, *, node_agent: bool = True, timeout_s: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self._certs()
        self.ports = {k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "kubelet")}
        try:
            self._start_etcd(bins)
            self._start_apiserver(bins, timeout_s)
            for comp, user in (("kube-controller-manager", "system:kube-controller-manager"),
                               ("kube-scheduler", "system:kube-scheduler")):
                self._write_kubeconfig(self.root / f"{comp}.kubeconfig", comp, user)
            self._start_controller_manager(bins)
            self._start_scheduler(bins)
            self._write_kubeconfig(self.root / "node.kubeconfig", "node", f"system:node:{self.node_name}")
            if node_agent:
                self._start_node_agent()
                self._start_rollouts_standin()
        except BaseException:
            self.stop()
            raise
        self._save()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops every process of this cluster, node agent first so its pods go with it."""
        order = ["rollouts-standin", "node-agent", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
        for comp in order:
            pid = self.pids.pop(comp, None)
            if pid:
                _kill_group(pid, grace_s)
        if self.state_file.exists():
            self.state_file.unlink()

    @classmethod
    def load(cls, root: Path) -> Cluster | None:
        f = root / "state.json"
        if not f.exists():
            return None
        d = json.loads(f.read_text())
        return cls(name=d["name"], root=root, contexts=tuple(d["contexts"]), pod_ip_prefix=d["pod_ip_prefix"],
                   ports=d["ports"], pids=d["pids"])

    def alive(self) -> bool:
        return bool(self.pids) and all(_alive(p) for p in self.pids.values())

    def _save(self) -> None:
        self.state_file.write_text(json.dumps({"name": self.name, "contexts": list(self.contexts),
                                               "pod_ip_prefix": self.pod_ip_prefix, "ports": self.ports,
                                               "pids": self.pids}, indent=2))

    # ---- pieces -------------------------------------------------------------------------------

    def _certs(self) -> None:
        d = self.pki
        certs.ca(d)
        certs.issue(d, "apiserver", "kube-apiserver", ips=("127.0.0.1", SERVICE_IP),
                    dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                         "kubernetes.default.svc.cluster.local"), server=True)
        certs.issue(d, "admin", "codemind-admin", "system:masters")
        certs.issue(d, "kube-controller-manager", "system:kube-controller-manager")
        certs.issue(d, "kube-scheduler", "system:kube-scheduler")
        certs.issue(d, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        certs.issue(d, "node", f"system:node:{self.node_name}", "system:nodes")
        certs.issue(d, "kubelet", self.node_name, ips=("127.0.0.1",), dns=("localhost", self.node_name),
                    server=True)
        certs.service_account_keys(d)

    def _spawn(self, comp: str, argv: list[str], env: dict | None = None) -> None:
        log = self.root / "logs" / f"{comp}.log"
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True, env=env)
        self.pids[comp] = p.pid
        self._save()

    def _start_etcd(self, bins: Path) -> None:
        c, peer = self.ports["etcd"], self.ports["etcd_peer"]
        self._spawn("etcd", [
            str(bins / "etcd"), "--name", "default", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])

    def _start_apiserver(self, bins: Path, timeout_s: float) -> None:
        d = self.pki
        self._spawn("kube-apiserver", [
            str(bins / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.ports["apiserver"]),
            "--tls-cert-file", str(d / "apiserver.crt"), "--tls-private-key-file", str(d / "apiserver.key"),
            "--client-ca-file", str(d / "ca.crt"),
            "--service-account-key-file", str(d / "sa.pub"),
            "--service-account-signing-key-file", str(d / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--kubelet-client-certificate", str(d / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(d / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(d / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP",
            "--profiling=false", "--v", "1",
        ])
        self._write_kubeconfig(self.admin_kubeconfig(), "admin", "codemind-admin")
        self._wait_ready(timeout_s)

    def _start_controller_manager(self, bins: Path) -> None:
        d, kc = self.pki, str(self.root / "kube-controller-manager.kubeconfig")
        self._spawn("kube-controller-manager", [
            str(bins / "kube-controller-manager"), "--kubeconfig", kc,
            "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
            "--service-account-private-key-file", str(d / "sa.key"), "--root-ca-file", str(d / "ca.crt"),
            "--use-service-account-credentials",
            "--cluster-signing-cert-file", str(d / "ca.crt"), "--cluster-signing-key-file", str(d / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--leader-elect=false", "--secure-port", "0", "--v", "1",
        ])

    def _start_scheduler(self, bins: Path) -> None:
        kc = str(self.root / "kube-scheduler.kubeconfig")
        self._spawn("kube-scheduler", [
            str(bins / "kube-scheduler"), "--kubeconfig", kc,
            "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
            "--leader-elect=false", "--secure-port", "0", "--v", "1",
        ])

    def _start_node_agent(self) -> None:
        d = self.pki
        self._spawn("node-agent", [
            sys.executable, "-m", "devcluster.nodeagent",
            "--kubeconfig", str(self.root / "node.kubeconfig"),
            "--admin-kubeconfig", str(self.admin_kubeconfig()),
            "--node-name", self.node_name,
            "--pod-ip-prefix", self.pod_ip_prefix,
            "--kubelet-port", str(self.ports["kubelet"]),
            "--tls-cert", str(d / "kubelet.crt"), "--tls-key", str(d / "kubelet.key"),
            "--client-ca", str(d / "ca.crt"),
            "--apiserver", self.server,
            "--state-dir", str(self.root / "node"),
        ], env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _start_rollouts_standin(self) -> None:
        # No Argo Rollouts controller runs here: devcluster/rollouts_standin.py does its part, and says so.
        self._spawn("rollouts-standin", [
            sys.executable, "-m", "devcluster.rollouts_standin", "--kubeconfig", str(self.admin_kubeconfig()),
        ], env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _write_kubeconfig(self, path: Path, name: str, user: str) -> None:
        crt = {"admin": "admin", "node": "node"}.get(name, name)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": self.name,
            "clusters": [{"name": self.name, "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate": str(self.pki / f"{crt}.crt"),
                                              "client-key": str(self.pki / f"{crt}.key")}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": user}}],
        }, indent=2))

    def _wait_ready(self, timeout_s: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            for comp in ("etcd", "kube-apiserver"):
                if not _alive(self.pids.get(comp, 0)):
                    raise RuntimeError(f"{comp} of cluster {self.name} exited:\n{self.log_tail(comp)}")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.25)
        raise RuntimeError(f"kube-apiserver of cluster {self.name} not ready after {timeout_s:.0f}s ({last}):\n"
                           f"{self.log_tail('kube-apiserver')}")

    def log_tail(self, comp: str, lines: int = 20) -> str:
        f = self.root / "logs" / f"{comp}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.exists() else "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_group(pid: int, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.05)


def merged_kubeconfig(home: Path, clusters: list[Cluster]) -> Path:
    """One kubeconfig with a context per environment group: dev-staging, production, dr."""
    out = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    for c in clusters:
        out["clusters"].append({"name": c.name, "cluster": {"server": c.server,
                                                            "certificate-authority": str(c.pki / "ca.crt")}})
        out["users"].append({"name": f"admin@{c.name}", "user": {
            "client-certificate": str(c.pki / "admin.crt"), "client-key": str(c.pki / "admin.key")}})
        for ctx in c.contexts:
            out["contexts"].append({"name": ctx, "context": {"cluster": c.name, "user": f"admin@{c.name}"}})
    out["current-context"] = out["contexts"][0]["name"]
    path = kubeconfig_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return path


def install_crds(kubeconfig: Path, context: str | None = None, crd_dir: Path | None = None) -> list[str]:
    """Creates every CRD under ../shared/k8s/crds and waits until each is Established."""
    import yaml
    from kubernetes import client, config

    crd_dir = crd_dir or SHARED_K8S / "crds"
    if not crd_dir.is_dir():
        raise RuntimeError(f"CRDs not found at {crd_dir}: the shared folder must sit beside the repository "
                           "(or set CODEMIND_SHARED to it)")
    api = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig), context=context))
    names = []
    for f in sorted(crd_dir.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            try:
                api.create_custom_resource_definition(doc)
            except client.ApiException as e:
                if e.status != 409:
                    raise
            names.append(doc["metadata"]["name"])
    deadline = time.monotonic() + 30
    for n in names:
        while True:
            conds = api.read_custom_resource_definition(n).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {n} not Established after 30s")
            time.sleep(0.2)
    return names


def up(home: Path, names: tuple[str, ...] = tuple(CLUSTERS), *, node_agent: bool = True,
       crds: bool = True) -> list[Cluster]:
    """Builds (or reuses) the binaries and starts each named cluster under home/kube/<name>, side by side."""
    from concurrent.futures import ThreadPoolExecutor

    bins = build.build()

    def start(name: str) -> Cluster:
        root = kube_dir(home) / name
        old = Cluster.load(root)
        if old and old.alive():
            _say(f"cluster {name} already running at {old.server}")
            return old
        if old:
            old.stop()
        c = Cluster(name=name, root=root, contexts=CLUSTERS[name], pod_ip_prefix=POD_IP_PREFIX[name])
        t0 = time.monotonic()
        _say(f"starting cluster {name} (contexts {', '.join(c.contexts)})")
        c.start(bins, node_agent=node_agent)
        try:
            if crds:
                install_crds(c.admin_kubeconfig())
        except BaseException:
            c.stop()
            raise
        _say(f"cluster {name} ready at {c.server} in {time.monotonic() - t0:.1f}s")
        return c

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = [pool.submit(start, n) for n in names]
    started = [f.result() for f in futures if f.exception() is None]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for c in started:
            c.stop()
        raise errors[0]
    merged_kubeconfig(home, started)
    return started


def down(home: Path) -> int:
    """Stops every cluster started under home; returns how many were running."""
    n = 0
    d = kube_dir(home)
    for root in sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []:
        c = Cluster.load(root)
        if c:
            n += c.alive()
            c.stop()
    return n
