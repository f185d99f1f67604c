"""Runs one pod's containers as local process trees: env, volumes, namespaces, probes, restarts, logs.

The same file is the pre-exec wrapper (`python -I -S podrun.py exec SPEC.json` and `... pause`), so its
top-level imports are standard library only; the kubernetes client is reached through `NodeContext.core`.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST_IP = "127.0.0.1"
GRACE_CAP_S = 10.0
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS = 38
API_DATA_VOLUMES = ("configMap", "secret", "projected", "downwardAPI")


# ---- small helpers -------------------------------------------------------------------------------

def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ts_nano(ns: int) -> str:
    """RFC3339 with nine fraction digits, the fixed width the kubelet's `timestamps=true` output uses."""
    s, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` is `$`, anything else stays as written."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "$" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            end = s.find(")", i + 2) if nxt == "(" else -1
            if end != -1:
                name = s[i + 2:end]
                out.append(env.get(name, s[i:end + 1]))
                i = end + 1
                continue
        out.append(s[i])
        i += 1
    return "".join(out)


def image_repository(image: str) -> str:
    image = image.split("@", 1)[0]
    head, _, tag = image.rpartition(":")
    return head if head and "/" not in tag else image


_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(q: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q).strip())
    if not m or m[2] not in _SUFFIX:
        raise ValueError(f"unsupported quantity {q!r}")
    return float(m[1]) * _SUFFIX[m[2]]


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; the empty selector selects all."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values") or []
        has = k in labels
        if (op == "In" and not (has and labels[k] in vals)) or (op == "NotIn" and has and labels[k] in vals) \
                or (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def egress_isolation(pod: dict, policies: list[dict]) -> str:
    """'none', 'deny-all' (Egress isolated, no rule allows anything) or 'partial' (rules exist, not enforced)."""
    labels = pod["metadata"].get("labels") or {}
    chosen = [p["spec"] for p in policies
              if "Egress" in (p["spec"].get("policyTypes") or (["Egress"] if p["spec"].get("egress") else []))
              and selects(p["spec"].get("podSelector") or {}, labels)]
    if not chosen:
        return "none"
    return "partial" if any(s.get("egress") for s in chosen) else "deny-all"


class SetupError(Exception):
    """A pod or container cannot start yet: `reason` is the waiting reason the kubelet would report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class IPPool:
    """Loopback pod IPs `<prefix>.x.y` (y never 0 or 255), handed out round-robin and unique machine-wide: each
    is held by an flock in lock_dir, so agents of concurrent test sessions with the same prefix never collide."""

    def __init__(self, prefix: str, lock_dir: Path = Path("/tmp/codemind-pod-ips")):
        if not re.fullmatch(r"127\.(25[0-5]|2[0-4]\d|1?\d?\d)", prefix):
            raise ValueError(f"pod IP prefix must be two octets inside 127/8, like 127.77; got {prefix!r}")
        self.prefix, self.lock_dir, self.cursor, self.lock = prefix, lock_dir, 0, threading.Lock()
        self.held: dict[str, int] = {}  # ip -> fd holding its lock

    def _hold(self, ip: str) -> bool:
        if ip in self.held:
            return False
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_dir / ip, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.held[ip] = fd
        return True

    def take(self, want: str | None = None) -> str:
        with self.lock:
            if want and want.startswith(self.prefix + ".") and self._hold(want):
                return want
            for i in range(256 * 254):
                n = (self.cursor + i) % (256 * 254)
                ip = f"{self.prefix}.{n // 254}.{n % 254 + 1}"
                if self._hold(ip):
                    self.cursor = n + 1
                    return ip
        raise SetupError("ContainerCreating", f"no free pod IP left in {self.prefix}.0.0/16")

    def free(self, ip: str | None) -> None:
        with self.lock:
            fd = self.held.pop(ip, None)
        if fd is not None:
            os.close(fd)  # closing drops the flock


# ---- cgroups: every process of a container, even one that left its session -----------------------

def cgroup_procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def cgroup_remove(path: Path, timeout_s: float = 2.0) -> None:
    """SIGKILLs whatever is left in the cgroup tree and removes it."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [path]:
        deadline = time.monotonic() + timeout_s
        while True:
            for pid in cgroup_procs(sub):
                _kill(pid, signal.SIGKILL)
            try:
                sub.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class NodeContext:
    """What every pod of this node shares: identity, API clients, directories, options."""

    name: str
    core: object  # kubernetes CoreV1Api as the node identity
    list_network_policies: Callable[[str], list[dict]]  # read with the admin identity
    state_dir: Path
    apiserver_port: int
    image_map: dict[str, dict]
    ips: IPPool
    cgroup_root: Path | None
    log: Callable[[str], None]
    allocatable: dict[str, str] = field(default_factory=dict)


def raw(call, *args, **kw) -> dict:
    """A kubernetes client call's JSON body as plain dicts in API spelling (camelCase)."""
    return json.loads(call(*args, _preload_content=False, _request_timeout=15, **kw).data)


# ---- one run of a container ----------------------------------------------------------------------

class Instance:
    """One start of a container: its process, cgroup and log file."""

    def __init__(self, log: Path, cgroup: Path | None):
        self.log, self.cgroup = log, cgroup
        self.proc: subprocess.Popen | None = None
        self.started_at = time.monotonic()
        self.exited, self.log_done = threading.Event(), threading.Event()

    def signal(self, sig: int) -> None:
        if self.proc:
            _kill(self.proc.pid, sig, group=True)
        for pid in cgroup_procs(self.cgroup) if self.cgroup else []:
            _kill(pid, sig)

    def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        self.signal(signal.SIGTERM)
        if not self.exited.wait(grace_s):
            self.signal(signal.SIGKILL)


def identity(pod_spec: dict, c_spec: dict) -> dict:
    """The process identity a kubelet derives from the pod's and the container's securityContext."""
    pod_sc, sc = pod_spec.get("securityContext") or {}, c_spec.get("securityContext") or {}
    pick = lambda key: sc.get(key, pod_sc.get(key))
    uid, gid = pick("runAsUser"), pick("runAsGroup")
    groups = [g for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])] if g is not None]
    return {"uid": uid, "gid": gid if gid is not None else uid, "groups": groups,
            "non_root": bool(pick("runAsNonRoot")),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False}


class Container:
    """A container of the pod and what its status reports."""

    def __init__(self, spec: dict, kind: str, after_inits: bool = False):
        self.spec, self.kind, self.name = spec, kind, spec["name"]  # kind: init, sidecar or main
        self.state: dict = {"waiting": {"reason": "PodInitializing" if after_inits else "ContainerCreating"}}
        self.last_state: dict = {}
        self.restarts = self.crashes = 0
        self.ready = self.started = self.done = False
        self.exit_code: int | None = None
        self.container_id: str | None = None
        self.env: dict[str, str] = {}
        self.runs: list[Instance] = []

    def status(self, image_id: str) -> dict:
        s = {"name": self.name, "image": self.spec.get("image", ""), "imageID": image_id, "ready": self.ready,
             "restartCount": self.restarts, "started": self.started,
             "state": _exclusive(self.state), "lastState": _exclusive(self.last_state)}
        if self.container_id:
            s["containerID"] = self.container_id
        return s


def _exclusive(state: dict) -> dict:
    # Explicit nulls so the status patch drops the previous state (waiting -> running -> terminated).
    return {k: state.get(k) for k in ("waiting", "running", "terminated")} if state else {}


# ---- the pod -------------------------------------------------------------------------------------

class PodRunner:
    """Runs one pod bound to this node until it is deleted, vanishes or the agent stops."""

    def __init__(self, node: NodeContext, pod: dict, on_done: Callable[[PodRunner], None]):
        self.node, self.pod, self.on_done = node, pod, on_done
        meta, spec = pod["metadata"], pod["spec"]
        self.uid, self.ns, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.key = f"{self.ns}/{self.name}"
        self.dir = node.state_dir / "pods" / self.uid
        self.policy = spec.get("restartPolicy", "Always")
        self.inits = [Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
                      for c in spec.get("initContainers") or []]
        self.mains = [Container(c, "main", bool(self.inits)) for c in spec["containers"]]
        self.ip: str | None = None
        self.pause: subprocess.Popen | None = None
        self.volumes: dict[str, str] = {}
        self.initialized = not self.inits
        self.init_failed = self.sandbox_ready = False
        self.start_time = now()
        self.term_grace = min(float(spec.get("terminationGracePeriodSeconds", 30)), GRACE_CAP_S)
        self.stopping, self.stop_mode, self.grace = threading.Event(), "", self.term_grace
        self.containers_stopped = False
        self.lock = threading.RLock()
        self.last_sent: dict | None = None
        self.cond_since: dict[str, tuple[str, str]] = {}
        self.terminal_on_arrival = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        self.thread = threading.Thread(target=self._thread, name=f"pod {self.key}", daemon=True)

    @property
    def containers(self) -> list[Container]:
        return self.inits + self.mains

    def log(self, msg: str) -> None:
        self.node.log(f"pod {self.key}: {msg}")

    # -- control from the agent --

    def start(self) -> None:
        self.thread.start()
        self.update(self.pod)

    def update(self, pod: dict) -> None:
        self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self.stopping.is_set():
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            self.stop("delete", min(float(grace), GRACE_CAP_S))

    def stop(self, mode: str, grace_s: float) -> None:
        """mode: delete (then delete the object), vanish (object is gone) or shutdown (agent stops)."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.stop_mode, self.grace = mode, grace_s
            self.stopping.set()
            running = [c.runs[-1] for c in self.containers if c.runs and not c.runs[-1].exited.is_set()]
        if running:
            self.log(f"stopping ({mode}): SIGTERM, SIGKILL after {grace_s:.0f}s")
        for inst in running:
            threading.Thread(target=inst.stop, args=(grace_s,), daemon=True).start()

    def log_source(self, container: str, previous: bool) -> tuple[Path, threading.Event]:
        """The log file of the container's current (or previous) run; LookupError(status, message) if none."""
        c = next((c for c in self.containers if c.name == container), None)
        if c is None:
            raise LookupError(404, f'container "{container}" is not valid for pod "{self.name}"')
        with self.lock:
            runs = list(c.runs)
        if previous:
            if len(runs) < 2:
                raise LookupError(400, f'previous terminated container "{container}" in pod "{self.name}" not found')
            return runs[-2].log, runs[-2].log_done
        if not runs:
            reason = c.state.get("waiting", {}).get("reason", "ContainerCreating")
            raise LookupError(400, f'container "{container}" in pod "{self.name}" is waiting to start: {reason}')
        return runs[-1].log, runs[-1].log_done

    # -- the pod's life --

    def _thread(self) -> None:
        try:
            if not self.terminal_on_arrival:
                self._run_pod()
        except Exception:  # noqa: BLE001 - logged; the pod still tears down
            self.log(f"crashed:\n{traceback.format_exc()}")
        finally:
            self._teardown_sandbox()
            self.containers_stopped = True
        if not self.terminal_on_arrival:
            self.log(f"processes stopped; phase {self._phase()}")
        self._report()
        self.stopping.wait()
        try:
            if self.stop_mode == "delete":
                self._report()
                self._delete_object()
            if self.stop_mode in ("delete", "vanish"):
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self.on_done(self)

    def _run_pod(self) -> None:
        self.log(f"accepted (uid {self.uid})")
        self._report()
        if not self._prepare() or not self._run_inits():
            return
        threads = [self._supervise_in_thread(c) for c in self.mains]
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(5)
            self._report()  # retries a status patch that failed during an apiserver hiccup
        for c in self.inits:
            if c.kind == "sidecar" and c.runs:
                c.done = True
                c.runs[-1].stop(self.term_grace)

    def _prepare(self) -> bool:
        """Checks images and commands, then makes the sandbox (IP, network namespace) and the volumes."""
        static = {c.name: e for c in self.containers if (e := self._static_error(c))}
        if static:
            for c in self.containers:
                if c.name in static:
                    c.state = {"waiting": {"reason": static[c.name].reason, "message": static[c.name].message}}
                    self.log(f"container {c.name}: {static[c.name].reason}: {static[c.name].message}")
            self._report()
            return False
        delay = 0.1
        while not self.stopping.is_set():
            try:
                self._sandbox()
                self.volumes = self._make_volumes()
                return True
            except SetupError as e:
                msg = e.message
            except Exception as e:  # noqa: BLE001 - an API hiccup or a write error: report it and retry
                msg = f"{type(e).__name__}: {e}"
            for c in self.containers:
                c.state = {"waiting": {"reason": "ContainerCreating", "message": msg}}
            self.log(f"not ready to start: {msg}")
            self._report()
            if self.stopping.wait(delay):
                break
            delay = min(delay * 2, 5.0)
        return False

    def _static_error(self, c: Container) -> SetupError | None:
        image = c.spec.get("image", "")
        if self._image(image) is None:
            known = ", ".join(f"{p}*" for p in self.node.image_map)
            return SetupError("ErrImagePull", f'image "{image}" is not mapped to a local environment: this node '
                                              f"agent runs images whose repository matches {known} (--image-map)")
        ident = identity(self.pod["spec"], c.spec)
        if ident["non_root"] and not ident["uid"]:  # the mapped images run as the agent's user: root
            return SetupError("CreateContainerConfigError",
                              f'container "{c.name}" has runAsNonRoot and image will run as root: set runAsUser')
        # The mapped images have no ENTRYPOINT, so as with such an image in Docker, args alone are the command.
        if not c.spec.get("command") and not c.spec.get("args"):
            return SetupError("CreateContainerError", f'container "{c.name}" has no command: the codemind node agent '
                                                      "has no image entrypoints, so spec.command or args must be set")
        return None

    def _image(self, image: str) -> dict | None:
        repo = image_repository(image)
        return next((v for p, v in self.node.image_map.items() if repo.startswith(p)), None)

    def _sandbox(self) -> None:
        if self.ip is None:
            if self.pod["spec"].get("hostNetwork"):
                self.ip = HOST_IP
            else:
                self.ip = self.node.ips.take(self.pod.get("status", {}).get("podIP"))
        if self.pause is None and not self.pod["spec"].get("hostNetwork"):
            isolation = egress_isolation(self.pod, self.node.list_network_policies(self.ns))
            if isolation == "partial":
                self.log("NetworkPolicy egress rules select this pod: not enforced here (only deny-all is)")
            if isolation == "deny-all":
                self.pause = subprocess.Popen([sys.executable, "-I", "-S", __file__, "pause"], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, start_new_session=True, env={})
                if self.pause.stdout.readline().strip() != b"ready":
                    raise SetupError("ContainerCreating", "could not make the pod's network namespace")
                self.log(f"deny-all egress NetworkPolicy: own network namespace (holder pid {self.pause.pid})")
        self.sandbox_ready = True

    def _teardown_sandbox(self) -> None:
        if self.pause:
            self.pause.kill()
            self.pause.wait()
        if self.node.cgroup_root:
            cgroup_remove(self.node.cgroup_root / self.uid)
        if self.ip != HOST_IP:
            self.node.ips.free(self.ip)

    def _run_inits(self) -> bool:
        for c in self.inits:
            if c.kind == "sidecar":
                self._supervise_in_thread(c)
                while not (c.started or self.stopping.wait(0.1)):
                    pass
                continue
            while True:
                code = self._run_once(c)
                if code is None or self.stopping.is_set():
                    return False
                if code == 0:
                    c.done, c.ready = True, True
                    break
                if self.policy == "Never":
                    self.init_failed = True
                    self._report()
                    return False
                if not self._backoff(c):
                    return False
        self.initialized = True
        self._report()
        return True

    def _supervise_in_thread(self, c: Container) -> threading.Thread:
        t = threading.Thread(target=self._supervise, args=(c,), name=f"{self.key}/{c.name}", daemon=True)
        t.start()
        return t

    def _supervise(self, c: Container) -> None:
        """Runs a container again and again as restartPolicy says."""
        while True:
            code = self._run_once(c)
            if code is None or self.stopping.is_set():
                break
            if c.kind == "sidecar" and c.done:
                break
            if c.kind == "sidecar" or self.policy == "Always" or (self.policy == "OnFailure" and code != 0):
                if self._backoff(c):
                    continue
                break
            c.done = True
            break
        self._report()

    def _backoff(self, c: Container) -> bool:
        """Waits before a restart: 0.5 s doubling to 8 s, reset after a run of 30 s."""
        if time.monotonic() - c.runs[-1].started_at > 30:
            c.crashes = 0
        delay = min(0.5 * 2 ** c.crashes, 8.0)
        c.crashes += 1
        with self.lock:
            c.last_state = c.state
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message":
                                   f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}"}}
        self._report()
        return not self.stopping.wait(delay)

    def _run_once(self, c: Container) -> int | None:
        """Starts the container, runs its probes, waits for it to exit; None if the pod stopped first."""
        delay = 0.1
        while True:
            if self.stopping.is_set():
                return None
            try:
                env = self._env(c)
                mounts = self._mounts(c, env)
                break
            except SetupError as e:
                c.state = {"waiting": {"reason": e.reason, "message": e.message}}
                self.log(f"container {c.name}: {e.reason}: {e.message}")
            self._report()
            if self.stopping.wait(delay):
                return None
            delay = min(delay * 2, 5.0)
        c.env = env
        n = len(c.runs)
        cg = self.node.cgroup_root / self.uid / f"{c.name}-{n}" if self.node.cgroup_root else None
        inst = Instance(self.dir / "logs" / c.name / f"{n}.log", cg)
        inst.log.parent.mkdir(parents=True, exist_ok=True)
        inst.log.touch()  # a log request may come before the first line
        argv = [expand(a, env) for a in (c.spec.get("command") or []) + (c.spec.get("args") or [])]
        err = self._spawn(c, inst, argv, env, mounts)
        with self.lock:
            if n:
                c.restarts += 1
            c.runs.append(inst)
            if self.stopping.is_set():
                threading.Thread(target=inst.stop, args=(self.grace,), daemon=True).start()
        if err:
            self.log(f"container {c.name}: could not start: {err}")
            code, started = 128, now()
            if inst.cgroup:
                cgroup_remove(inst.cgroup)
            inst.exited.set()
            inst.log_done.set()
        else:
            started = now()
            with self.lock:
                c.container_id = f"codemind://{inst.proc.pid}"
                c.state = {"running": {"startedAt": started}}
                c.started = "startupProbe" not in c.spec
                c.ready = c.kind != "init" and "readinessProbe" not in c.spec
            self.log(f"container {c.name}: started pid {inst.proc.pid}" + (f" (restart {c.restarts})" if n else ""))
            self._report()
            pumps = self._pump_logs(inst)
            if c.kind != "init":
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if kind in c.spec:
                        threading.Thread(target=self._probe_loop, args=(c, inst, kind, c.spec[kind]),
                                         daemon=True).start()
            rc = inst.proc.wait()
            inst.exited.set()
            inst.signal(signal.SIGKILL)  # what is left of the container goes with its main process
            if inst.cgroup:
                cgroup_remove(inst.cgroup)
            for t in pumps:
                t.join(5)
            inst.log_done.set()
            code = 128 - rc if rc < 0 else rc
        term = {"exitCode": code, "reason": "Completed" if code == 0 else ("StartError" if err else "Error"),
                "startedAt": started, "finishedAt": now()}
        if err:
            term["message"] = err
        elif code and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            term["message"] = self._log_tail(inst.log)
        if code > 128 and not err:
            term["signal"] = code - 128
        with self.lock:
            c.exit_code, c.ready, c.started = code, False, False
            c.state = {"terminated": term}
        self.log(f"container {c.name}: exited {code}")
        self._report()
        return code

    def _spawn(self, c: Container, inst: Instance, argv: list[str], env: dict, mounts: list[dict]) -> str:
        """Starts the pre-exec wrapper in a new session; returns why exec failed, or '' once it succeeded."""
        scratch = self.dir / "scratch" / f"{c.name}-{len(c.runs)}"
        scratch.mkdir(parents=True, exist_ok=True)
        if inst.cgroup:
            inst.cgroup.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        spec = {"argv": argv, "env": env, "cwd": self._cwd(c), "mounts": mounts, "status_fd": w,
                "netns": self.pause.pid if self.pause else None, "scratch": str(scratch),
                "cgroup": str(inst.cgroup) if inst.cgroup else None, **identity(self.pod["spec"], c.spec),
                "image_paths": self._image(c.spec["image"]).get("paths") or []}
        path = scratch / "spec.json"
        path.write_text(json.dumps(spec))
        path.chmod(0o600)  # it holds the container's env, secrets included
        try:
            inst.proc = subprocess.Popen([sys.executable, "-I", "-S", __file__, "exec", str(path)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         pass_fds=(w,), start_new_session=True, env={})
        except OSError as e:
            os.close(r)
            path.unlink(missing_ok=True)
            return f"could not start the wrapper: {e}"
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as status:
            err = status.read().decode(errors="replace")  # EOF with nothing: exec happened
        path.unlink(missing_ok=True)
        if err:
            inst.proc.wait()
            inst.proc.stdout.close()
            inst.proc.stderr.close()
        return err

    def _cwd(self, c: Container) -> str:
        return c.spec.get("workingDir") or self._image(c.spec["image"]).get("workingDir") or "/"

    def _pump_logs(self, inst: Instance) -> list[threading.Thread]:
        """Copies stdout/stderr into a CRI-style log file, each line stamped with the time it arrived."""
        out = open(inst.log, "ab")  # noqa: SIM115 - closed by the last pump thread
        lock = threading.Lock()
        left = [2]

        def pump(pipe, stream: bytes) -> None:
            for line in iter(pipe.readline, b""):
                stamp = ts_nano(time.time_ns()).encode()
                with lock:
                    out.write(b"%s %s F %s\n" % (stamp, stream, line.rstrip(b"\n")))
                    out.flush()
            pipe.close()
            with lock:
                left[0] -= 1
                if not left[0]:
                    out.close()

        threads = [threading.Thread(target=pump, args=(inst.proc.stdout, b"stdout"), daemon=True),
                   threading.Thread(target=pump, args=(inst.proc.stderr, b"stderr"), daemon=True)]
        for t in threads:
            t.start()
        return threads

    @staticmethod
    def _log_tail(path: Path, limit: int = 2048) -> str:
        lines = [ln.split(" ", 3)[-1] for ln in path.read_text(errors="replace").splitlines()[-80:]]
        return "\n".join(lines)[-limit:]

    # -- env and volumes --

    def _get(self, kind: str, name: str) -> dict | None:
        from kubernetes.client import ApiException

        read = {"configMap": self.node.core.read_namespaced_config_map,
                "secret": self.node.core.read_namespaced_secret}[kind]
        try:
            obj = raw(read, name, self.ns)
        except ApiException as e:
            if e.status == 404:
                return None
            raise SetupError("CreateContainerConfigError", f'{kind} "{name}": {e.status} {e.reason}') from e
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()} if kind == "configMap" else \
            {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _key(self, kind: str, ref: dict) -> str | None:
        data = self._get(kind, ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            what = f'{kind} "{ref["name"]}" not found' if data is None else \
                f'couldn\'t find key {ref["key"]} in {kind} {self.ns}/{ref["name"]}'
            raise SetupError("CreateContainerConfigError", what)
        return data[ref["key"]].decode(errors="replace")

    def _field(self, path: str, *, whole_maps: bool = False) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {"metadata.name": meta["name"], "metadata.namespace": self.ns, "metadata.uid": self.uid,
                  "spec.nodeName": self.node.name, "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                  "status.podIP": self.ip or "", "status.podIPs": self.ip or "", "status.hostIP": HOST_IP,
                  "status.hostIPs": HOST_IP}
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.+)'\])?", path)
        if m and (m[2] is not None or whole_maps):
            d = meta.get(m[1]) or {}
            if m[2] is not None:
                return d.get(m[2], "")
            return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(d.items()))
        raise SetupError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")

    def _resource(self, ref: dict, cname: str | None) -> str:
        spec = next((c.spec for c in self.containers if c.name == cname), self.mains[0].spec)
        kind, _, res = ref["resource"].partition(".")
        value = ((spec.get("resources") or {}).get(kind) or {}).get(res)
        if value is None:  # unset limits are the node's allocatable, unset requests are zero
            value = self.node.allocatable.get(res, "0") if kind == "limits" else "0"
        n = quantity(value) / quantity(ref.get("divisor") or "1")
        return str(int(-(-n // 1)))

    def _env(self, c: Container) -> dict[str, str]:
        """The container's environment, built as a kubelet builds it, on top of the image's basics."""
        port = str(self.node.apiserver_port)
        env = {"KUBERNETES_SERVICE_HOST": HOST_IP, "KUBERNETES_SERVICE_PORT": port,
               "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{HOST_IP}:{port}",
               "KUBERNETES_PORT_443_TCP": f"tcp://{HOST_IP}:{port}", "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
               "KUBERNETES_PORT_443_TCP_PORT": port, "KUBERNETES_PORT_443_TCP_ADDR": HOST_IP}
        for src in c.spec.get("envFrom") or []:
            kind, ref = ("configMap", src["configMapRef"]) if "configMapRef" in src else ("secret", src["secretRef"])
            data = self._get(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise SetupError("CreateContainerConfigError", f'{kind} "{ref["name"]}" not found')
            env.update({src.get("prefix", "") + k: v.decode(errors="replace") for k, v in data.items() if "=" not in k})
        for e in c.spec.get("env") or []:
            vf = e.get("valueFrom")
            if vf is None:
                value = expand(e.get("value", ""), env)
            elif "fieldRef" in vf:
                value = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                value = self._resource(vf["resourceFieldRef"], vf["resourceFieldRef"].get("containerName") or c.name)
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                kind = "configMap" if "configMapKeyRef" in vf else "secret"
                value = self._key(kind, vf["configMapKeyRef" if kind == "configMap" else "secretKeyRef"])
                if value is None:
                    continue
            else:
                raise SetupError("CreateContainerConfigError", f"env {e['name']}: unsupported valueFrom {list(vf)}")
            env[e["name"]] = value
        basics = {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TZ") if k in os.environ}
        hostname = self.pod["spec"].get("hostname") or self.name
        return {"HOME": "/root", **basics, **self._image(c.spec["image"]).get("env", {}), "HOSTNAME": hostname, **env}

    def _files(self, kind: str, src: dict, name_key: str = "name") -> dict[str, tuple[bytes, int | None]]:
        name = src.get(name_key) or src.get("name")
        data = self._get(kind, name)
        if data is None:
            if src.get("optional"):
                return {}
            raise SetupError("ContainerCreating", f'MountVolume.SetUp failed: {kind} "{name}" not found')
        if not src.get("items"):
            return {k: (v, None) for k, v in data.items()}
        out = {}
        for it in src["items"]:
            if it["key"] in data:
                out[it["path"]] = (data[it["key"]], it.get("mode"))
            elif not src.get("optional"):
                raise SetupError("ContainerCreating", f'MountVolume.SetUp failed: {kind} "{name}" has no key {it["key"]}')
        return out

    def _downward(self, src: dict) -> dict[str, tuple[bytes, int | None]]:
        out = {}
        for it in src.get("items") or []:
            if "fieldRef" in it:
                value = self._field(it["fieldRef"]["fieldPath"], whole_maps=True)
            else:
                value = self._resource(it["resourceFieldRef"], it["resourceFieldRef"].get("containerName"))
            out[it["path"]] = (value.encode(), it.get("mode"))
        return out

    def _token(self, src: dict) -> dict[str, tuple[bytes, int | None]]:
        spec = {"expirationSeconds": src.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        tr = raw(self.node.core.create_namespaced_service_account_token, sa, self.ns, {"spec": spec})
        return {src["path"]: (tr["status"]["token"].encode(), None)}

    def _make_volumes(self) -> dict[str, str]:
        """Materializes every volume under the pod's directory (hostPath volumes are the host's own path)."""
        out = {}
        for v in self.pod["spec"].get("volumes") or []:
            name, kind = v["name"], next((k for k in v if k != "name"), "?")
            if kind == "hostPath":
                out[name] = self._host_path(v["hostPath"])
                continue
            d = self.dir / "volumes" / name
            if kind in API_DATA_VOLUMES:
                shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)
            src = v[kind]
            if kind == "emptyDir":
                d.chmod(0o777)
            elif kind == "configMap":
                _write(d, self._files("configMap", src), src.get("defaultMode", 0o644))
            elif kind == "secret":
                _write(d, self._files("secret", src, "secretName"), src.get("defaultMode", 0o644))
            elif kind == "downwardAPI":
                _write(d, self._downward(src), src.get("defaultMode", 0o644))
            elif kind == "projected":
                files = {}
                for s in src.get("sources") or []:
                    if "serviceAccountToken" in s:
                        files.update(self._token(s["serviceAccountToken"]))
                    elif "configMap" in s:
                        files.update(self._files("configMap", s["configMap"]))
                    elif "secret" in s:
                        files.update(self._files("secret", s["secret"]))
                    elif "downwardAPI" in s:
                        files.update(self._downward(s["downwardAPI"]))
                    else:
                        raise SetupError("ContainerCreating", f"volume {name}: projected source {list(s)} not supported")
                _write(d, files, src.get("defaultMode", 0o644))
            else:
                raise SetupError("ContainerCreating", f"volume {name}: {kind} volumes are not supported by the "
                                                      "codemind node agent (emptyDir, configMap, secret, projected, "
                                                      "downwardAPI and hostPath are)")
            out[name] = str(d)
        return out

    @staticmethod
    def _host_path(hp: dict) -> str:
        path, kind = hp["path"], hp.get("type", "")
        if kind == "DirectoryOrCreate":
            os.makedirs(path, exist_ok=True)
        elif kind == "FileOrCreate" and not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        elif kind in ("Directory", "File", "Socket") and not os.path.exists(path):
            raise SetupError("ContainerCreating", f"hostPath {path} ({kind}) does not exist")
        return path

    def _mounts(self, c: Container, env: dict) -> list[dict]:
        kinds = {v["name"]: next((k for k in v if k != "name"), "") for v in self.pod["spec"].get("volumes") or []}
        out = []
        for m in c.spec.get("volumeMounts") or []:
            if m["name"] not in self.volumes:
                raise SetupError("CreateContainerConfigError", f"volumeMount {m['name']}: no such volume in the pod")
            sub = expand(m["subPathExpr"], env) if m.get("subPathExpr") else m.get("subPath", "")
            if sub.startswith("/") or ".." in Path(sub).parts:
                raise SetupError("CreateContainerConfigError", f"subPath {sub!r} must be a relative path inside the volume")
            source = os.path.join(self.volumes[m["name"]], sub) if sub else self.volumes[m["name"]]
            if not os.path.exists(source):
                os.makedirs(source)
            out.append({"source": source, "target": m["mountPath"],
                        "readOnly": bool(m.get("readOnly")) or kinds[m["name"]] in API_DATA_VOLUMES})
        return out

    # -- probes --

    def _probe_loop(self, c: Container, inst: Instance, kind: str, p: dict) -> None:
        """Runs one probe for as long as this run of the container lasts, and acts on its thresholds."""
        period, timeout = p.get("periodSeconds", 10), p.get("timeoutSeconds", 1)
        ok_needed, fail_needed = p.get("successThreshold", 1), p.get("failureThreshold", 3)
        if kind != "startupProbe":
            while not c.started and not inst.exited.wait(0.1):
                pass
        if inst.exited.wait(p.get("initialDelaySeconds", 0)):
            return
        oks = fails = 0
        while not inst.exited.is_set() and not self.stopping.is_set():
            ok, why = self._probe(c, inst, p, timeout)
            oks, fails = (oks + 1, 0) if ok else (0, fails + 1)
            if not ok and inst.exited.is_set():
                return
            if kind == "readinessProbe" and ((ok and oks >= ok_needed and not c.ready)
                                             or (not ok and fails >= fail_needed and c.ready)):
                c.ready = ok
                self.log(f"container {c.name}: {'ready' if ok else f'not ready ({why})'}")
                self._report()
            elif kind == "startupProbe" and ok:
                c.started = True
                c.ready = c.ready or "readinessProbe" not in c.spec
                self._report()
                return
            elif kind != "readinessProbe" and fails >= fail_needed:
                self.log(f"container {c.name}: {kind} failed {fails} times ({why}): stopping it")
                inst.stop(self.term_grace)
                return
            if not ok and fails <= fail_needed:
                self.log(f"container {c.name}: {kind} failed: {why}")
            if inst.exited.wait(period):
                return

    def _probe(self, c: Container, inst: Instance, p: dict, timeout: float) -> tuple[bool, str]:
        try:
            if "exec" in p:
                return self._exec_probe(c, inst, p["exec"].get("command") or [], timeout)
            if "httpGet" in p:
                return self._http_probe(c, p["httpGet"], timeout)
            if "tcpSocket" in p:
                h = p["tcpSocket"]
                self._connect(h.get("host") or self.ip, self._port(c, h["port"]), timeout).close()
                return True, ""
            return False, f"unsupported probe handler {sorted(set(p) & {'grpc'}) or list(p)}"
        except (OSError, ValueError) as e:
            return False, f"{type(e).__name__}: {e}"

    def _port(self, c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def _connect(self, host: str, port: int, timeout: float) -> socket.socket:
        s = netns_socket(self.pause.pid) if self.pause else socket.socket()
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s

    def _http_probe(self, c: Container, h: dict, timeout: float) -> tuple[bool, str]:
        import http.client
        import ssl

        host, port = h.get("host") or self.ip, self._port(c, h["port"])
        sock = self._connect(host, port, timeout)
        if h.get("scheme", "HTTP").upper() == "HTTPS":
            sock = ssl._create_unverified_context().wrap_socket(sock, server_hostname=host)  # as the kubelet: no verify
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        try:
            headers = {"User-Agent": "kube-probe/1.36", "Accept": "*/*"}
            headers.update({x["name"]: x["value"] for x in h.get("httpHeaders") or []})
            conn.request("GET", h.get("path") or "/", headers=headers)
            status = conn.getresponse().status
        finally:
            conn.close()
        return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"

    def _exec_probe(self, c: Container, inst: Instance, command: list[str], timeout: float) -> tuple[bool, str]:
        path = self.dir / "scratch" / f"probe-{c.name}-{threading.get_ident()}.json"
        path.write_text(json.dumps({"argv": command, "env": c.env, "cwd": self._cwd(c),
                                    "join": inst.proc.pid, **identity(self.pod["spec"], c.spec)}))
        path.chmod(0o600)
        p = subprocess.Popen([sys.executable, "-I", "-S", __file__, "exec", str(path)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env={})
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(p.pid, signal.SIGKILL, group=True)
            p.wait()
            return False, f"command {command} timed out after {timeout}s"
        finally:
            path.unlink(missing_ok=True)
        return rc == 0, f"command {command} exited {rc}"

    # -- status --

    def _phase(self) -> str:
        if self.init_failed:
            return "Failed"
        deleted = self.stop_mode == "delete" and self.containers_stopped  # a kubelet ends deleted pods terminal
        if deleted or all(c.done for c in self.mains):
            codes = [c.exit_code for c in self.mains]
            return "Succeeded" if all(x == 0 for x in codes) else "Failed"
        if not self.initialized:
            return "Pending"
        return "Running" if any(c.runs for c in self.mains) else "Pending"

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict:
        status = "True" if ok else "False"
        if self.cond_since.get(kind, ("",))[0] != status:
            self.cond_since[kind] = (status, now())
        c = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": self.cond_since[kind][1]}
        if not ok and reason:
            c.update(reason=reason, message=message)
        return c

    def _status(self) -> dict:
        phase = self._phase()
        terminal = phase in ("Succeeded", "Failed")
        ready_set = self.mains + [c for c in self.inits if c.kind == "sidecar"]
        unready = [c.name for c in ready_set if not c.ready]
        conds = {x["type"]: x for x in self.pod.get("status", {}).get("conditions") or []}
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        gates_ok = all(conds.get(g, {}).get("status") == "True" for g in gates)
        why = ("PodCompleted", "") if terminal else ("ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
        pending_inits = [c.name for c in self.inits if not (c.done or c.started)]
        st = {
            "phase": phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.sandbox_ready and not terminal),
                self._condition("Initialized", self.initialized or terminal and not self.init_failed,
                                "ContainersNotInitialized", f"containers with incomplete status: [{' '.join(pending_inits)}]"),
                self._condition("ContainersReady", not unready and not terminal, *why),
                self._condition("Ready", not unready and not terminal and gates_ok, *why),
            ] + ([] if "PodScheduled" in conds else [self._condition("PodScheduled", True)]),
            "containerStatuses": [c.status(self._image_id(c)) for c in self.mains],
        }
        if self.inits:
            st["initContainerStatuses"] = [c.status(self._image_id(c)) for c in self.inits]
        if self.ip:
            st["podIP"], st["podIPs"] = self.ip, [{"ip": self.ip}]
        return st

    def _image_id(self, c: Container) -> str:
        return f"codemind://{image_repository(c.spec.get('image', ''))}" if self._image(c.spec.get("image", "")) else ""

    def _report(self) -> None:
        """Patches pods/status when it changed; a failed patch is retried by the next report."""
        from kubernetes.client import ApiException

        if self.stop_mode in ("vanish", "shutdown") or self.terminal_on_arrival:
            return
        with self.lock:
            st = self._status()
            if st == self.last_sent:
                return
            try:
                self.node.core.patch_namespaced_pod_status(
                    self.name, self.ns, {"metadata": {"uid": self.uid}, "status": st},
                    _content_type="application/strategic-merge-patch+json", _request_timeout=15)
                self.last_sent = st
            except ApiException as e:
                if e.status != 404:
                    self.log(f"status patch failed: {e.status} {e.reason}")
            except Exception as e:  # noqa: BLE001 - logged; the next report retries
                self.log(f"status patch failed: {type(e).__name__}: {e}")

    def _delete_object(self) -> None:
        from kubernetes.client import ApiException

        try:
            # In the body: with a body, the apiserver ignores the gracePeriodSeconds query parameter.
            self.node.core.delete_namespaced_pod(self.name, self.ns, body={
                "gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}, _request_timeout=15)
            self.log("deleted")
        except ApiException as e:
            if e.status not in (404, 409):
                self.log(f"delete failed: {e.status} {e.reason}")


def _write(d: Path, files: dict[str, tuple[bytes, int | None]], default_mode: int) -> None:
    for rel, (data, mode) in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise SetupError("ContainerCreating", f"volume file path {rel!r} must be relative, without '..'")
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(default_mode if mode is None else mode)


# ---- namespaces (used by the agent for probes, and by the wrapper) -------------------------------

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _setns(pid: int, ns: str, flag: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY)
    try:
        _check(_libc().setns(fd, flag), f"setns {ns} of pid {pid}")
    finally:
        os.close(fd)


def _mount(src: str | None, dst: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc().mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src or fstype} on {dst}")


def netns_socket(pid: int) -> socket.socket:
    """A TCP socket made inside pid's network namespace, in a throwaway thread (setns moves only that thread)."""
    box: list = []

    def make() -> None:
        try:
            _setns(pid, "net", CLONE_NEWNET)
            box.append(socket.socket())
        except OSError as e:
            box.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(box[0], OSError):
        raise box[0]
    return box[0]


class _MountPoints:
    """Makes missing mount points inside this mount namespace only: the nearest existing parent is shadowed by a
    tmpfs that re-binds its entries, so directories such as /opt/dagster never appear on the host."""

    def __init__(self, scratch: str):
        self.scratch, self.ours, self.shadows = scratch, set(), 0

    def ensure(self, path: str, is_dir: bool) -> str:
        path = os.path.normpath(path)
        if os.path.lexists(path):
            return os.path.realpath(path)
        parent = self.ensure(os.path.dirname(path), True)
        target = os.path.join(parent, os.path.basename(path))
        if parent not in self.ours and parent != "/":  # a new top-level directory is made on the host, once
            self._shadow(parent)
        if is_dir:
            os.mkdir(target)
        else:
            open(target, "w").close()
        self.ours.add(target)
        return target

    def _shadow(self, d: str) -> None:
        self.shadows += 1
        keep = os.path.join(self.scratch, f"shadow{self.shadows}")
        os.makedirs(keep)
        mode = os.stat(d).st_mode & 0o7777
        _mount(d, keep, flags=MS_BIND | MS_REC)
        fd = os.open(keep, os.O_RDONLY | os.O_DIRECTORY)  # keep may sit under d itself, hidden by the tmpfs
        _mount("tmpfs", d, "tmpfs", 0, f"mode={mode:o}")
        for name in os.listdir(fd):
            src, dst = f"/proc/self/fd/{fd}/{name}", os.path.join(d, name)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            if os.path.isdir(src):
                os.mkdir(dst)
            else:
                open(dst, "w").close()
            _mount(src, dst, flags=MS_BIND | MS_REC)
        self.ours.add(d)


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))  # SIOCSIFFLAGS |= IFF_UP


def _wrapper_exec(spec: dict) -> None:
    """In the new process: join or make the namespaces, bind the volumes, then exec the container's command."""
    status_fd = spec.get("status_fd")
    try:
        if spec.get("cgroup"):
            Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
        if spec.get("join"):  # an exec probe: the container's own mounts and network
            _setns(spec["join"], "net", CLONE_NEWNET)
            _setns(spec["join"], "mnt", CLONE_NEWNS)
            points = None
        else:
            if spec.get("netns"):
                _setns(spec["netns"], "net", CLONE_NEWNET)
            _check(_libc().unshare(CLONE_NEWNS), "unshare mount namespace")
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
            if spec.get("uid"):
                _image_view(spec.get("image_paths") or [])
            points = _MountPoints(spec["scratch"])
            mounts = sorted(spec.get("mounts") or [], key=lambda m: len(Path(m["target"]).parts))
            done = []
            for m in mounts:
                target = points.ensure(m["target"], os.path.isdir(m["source"]))
                _mount(m["source"], target, flags=MS_BIND | MS_REC)
                done.append((target, m))
            for target, m in done:
                if m["readOnly"]:
                    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        cwd = spec.get("cwd") or "/"
        os.chdir(points.ensure(cwd, True) if points else cwd)
        _become(spec)
        if status_fd is not None:
            os.set_inheritable(status_fd, False)  # closes on exec: EOF tells the agent the exec happened
    except Exception as e:  # noqa: BLE001 - told to the agent as StartError
        _wrapper_fail(status_fd, f"container setup failed: {e}")
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        what = "executable file not found in $PATH" if isinstance(e, FileNotFoundError) else e.strerror
        _wrapper_fail(status_fd, f'exec: "{spec["argv"][0]}": {what}')


def _image_view(paths: list[str]) -> None:
    """A directory on the way to the image's files that others cannot enter (such as /root) becomes, in this mount
    namespace, a tmpfs holding only those files: a non-root user reaches the image and nothing else under it."""
    closed: dict[str, list[str]] = {}
    for p in paths:
        parts = Path(p).parts
        top = next((str(Path(*parts[:i])) for i in range(2, len(parts) + 1)
                    if not os.stat(Path(*parts[:i])).st_mode & 0o001), None)
        if top and top != p:
            closed.setdefault(top, []).append(p)
    for top, inner in sorted(closed.items(), key=lambda kv: len(kv[0])):
        fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in inner}  # still reachable once the tmpfs hides top
        _mount("tmpfs", top, "tmpfs", 0, "mode=755")
        for p, fd in fds.items():
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", p, flags=MS_BIND | MS_REC)
            os.close(fd)


def _become(spec: dict) -> None:
    """no_new_privs, then the groups and user of the securityContext; a non-root uid keeps no capabilities."""
    if spec.get("no_new_privs"):
        _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if spec.get("uid") is None:
        return
    gid = spec["gid"] if spec.get("gid") is not None else spec["uid"]
    os.setgroups(sorted({gid, *spec.get("groups", [])}))
    os.setgid(gid)
    os.setuid(spec["uid"])
    if spec["uid"] and spec.get("env", {}).get("HOME") == "/root":
        spec["env"]["HOME"] = "/"  # what a runtime gives a uid without a passwd entry in the image


def _wrapper_fail(status_fd: int | None, msg: str) -> None:
    if status_fd is not None:
        os.write(status_fd, msg.encode())
    else:
        print(msg, file=sys.stderr)
    os._exit(127)


def _wrapper_pause() -> None:
    """Holds a network namespace with only its loopback up, like a pod sandbox's pause container."""
    _check(_libc().unshare(CLONE_NEWNET), "unshare network namespace")
    _lo_up()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        signal.pause()


if __name__ == "__main__":
    if sys.argv[1:2] == ["pause"]:
        _wrapper_pause()
    elif sys.argv[1:2] == ["exec"] and len(sys.argv) == 3:
        _wrapper_exec(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit("usage: podrun.py exec SPEC.json | pause")
