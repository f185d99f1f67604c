"""Local deploy target: blue/green app processes behind one stable-port TCP proxy per environment."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from codemind_dagster.settings import PUBLIC_PORTS, check_port_range

if TYPE_CHECKING:
    from codemind_dagster.domain.canary import CanaryStep, StepAnalysis

# Launched by path with -I so the proxy imports neither this package nor site customisations.
PROXY_SCRIPT = Path(__file__).with_name("proxy.py")
# The platform layer copied next to every release and started in front of the bundle's own app: it serves
# /metrics and honours CODEMIND_FAULT_*, whoever wrote the service (see service_support.py).
SUPPORT_SCRIPT = Path(__file__).with_name("service_support.py")
SUPPORT_MODULE = "codemind_service"
SERVICE_APP = f"{SUPPORT_MODULE}:app"

# Every process we start carries these, so a recycled pid is never taken for ours and processes
# a killed deployer never got to record can still be found and stopped.
ROOT_VAR = "CODEMIND_RUNTIME_ROOT"
TAG_VAR = "CODEMIND_RUNTIME_TAG"

# The control plane's environment holds credentials; services get only what they need to run.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STATE_VERSION = 1
_LOG_TAIL_LINES = 30

# Popen handles of the processes this interpreter started, polled so exited ones don't linger as zombies.
_children: dict[int, subprocess.Popen] = {}


class DeployError(RuntimeError):
    """The runtime itself cannot do its job (port taken, unusable bundle); not a verdict on the code."""


@dataclass(frozen=True)
class RuntimeStatus:
    service: str
    environment: str
    url: str
    port: int
    artifact: str
    pid: int | None  # None when the recorded process is no longer running
    healthy: bool  # GET /healthz through the public URL answered 200 {"status": "ok"}
    uptime_s: float | None
    memory_rss_bytes: int | None
    proxy_pid: int | None
    started_at: str
    # Set by runtimes whose services are pods (KubeRuntime); a process runtime leaves them at the defaults.
    pods_ready: int | None = None
    findings: tuple[str, ...] = ()  # hand edits detected against what the platform applied
    metrics_url: str | None = None  # the proxy's GET /metrics, per backend version; the service's is url + /metrics
    faults: tuple[tuple[str, str], ...] = ()  # CODEMIND_FAULT_* the live version was started with
    rollout: str | None = None  # a canary in progress: "canary 10% of ARTIFACT"


@dataclass(frozen=True)
class DeployOutcome:
    outcome: str  # "deployed" | "unchanged" | "rolled_back" | "failed"
    url: str
    artifact: str
    pid: int | None  # the process serving the URL afterwards
    previous_artifact: str | None
    reason: str
    duration_s: float
    canary: tuple[dict, ...] = ()  # one row per canary step analysed (StepAnalysis.row()), in order

    @property
    def ok(self) -> bool:
        return self.outcome in ("deployed", "unchanged")


class Rollout(Protocol):
    """What a canary deploy asks of its caller: the steps, and a verdict on each (see resources/canary.py)."""

    steps: tuple[CanaryStep, ...]

    def analyze(self, step: CanaryStep, *, url: str, metrics_url: str, stable: str,
                canary: str) -> StepAnalysis: ...


@dataclass(frozen=True)
class _Paths:
    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def target(self) -> Path:
        return self.dir / "target"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def releases(self) -> Path:
        return self.dir / "releases"


# How long a published port may stay busy before it counts as taken: a killed process's threads may still be
# exiting, and its sockets stay open until the last one has.
REBIND_GRACE_S = 5.0


class LocalRuntime:
    """Runs each (service, environment) as local processes; all state lives in files under `root`.

    root/<service>/<environment>/
        state.json   port, proxy, live and pending versions (pid, create_time, tag), replaced atomically
        target       `host:port` of the live version, re-read by the proxy on each new connection
        logs/        proxy.log, blue.log, green.log (+ .1 of the previous run of that color)
        data/        CODEMIND_DATA_DIR, shared by every version of the environment
        releases/    blue/ and green/: private copies of the bundles being run
        .lock        flock serialising deploy/stop of the environment across processes

    A first deploy that fails leaves nothing running (the proxy is stopped too); the port stays
    recorded and is reused by the next attempt if it is still free.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        health_timeout_s: float = 30.0,
        stop_grace_s: float = 10.0,
        probe_timeout_s: float = 0.5,
        public_ports: tuple[int, int] = PUBLIC_PORTS,
        rebind_grace_s: float = REBIND_GRACE_S,
    ) -> None:
        self.public_ports = check_port_range(*public_ports)
        self.rebind_grace_s = rebind_grace_s
        self.root = Path(root).resolve()
        self.host = host
        self.health_timeout_s = health_timeout_s
        self.stop_grace_s = stop_grace_s
        self.probe_timeout_s = probe_timeout_s

    # ---- public API -------------------------------------------------------------------------

    def deploy(
        self,
        *,
        service: str,
        environment: str,
        artifact: str,
        bundle_dir: Path,
        env: Mapping[str, str] | None = None,
        rollout: Rollout | None = None,
    ) -> DeployOutcome:
        """Start the artifact beside the live version and switch to it once healthy (with `rollout`: step by step)."""
        started = time.monotonic()
        paths = self._paths(service, environment)
        bundle_dir = _check_bundle(bundle_dir)
        faults = faults_of(env or {})  # a bad setting is refused before anything changes
        try:
            with self._locked(paths):
                return self._deploy(paths, service, environment, artifact, bundle_dir, env or {}, faults, rollout,
                                    started)
        finally:
            self._sync_monitoring()

    def _deploy(self, paths: _Paths, service: str, environment: str, artifact: str, bundle_dir: Path,
                env: Mapping[str, str], faults: dict, rollout: Rollout | None, started: float) -> DeployOutcome:
        """deploy() under the environment's lock."""
        _reap_children()
        state = _load_state(paths) or _new_state(service, environment)
        self._ensure_proxy(paths, state)
        adopted = self._recover(paths, state, artifact, faults)
        live = state.get("live")
        if adopted is None and self._serves(paths, state, live, artifact, faults):
            reason = f"{artifact} is already live and healthy"
            return self._outcome(state, "unchanged", artifact, live, artifact, reason, started)
        try:
            if adopted is None:
                new = self._start(paths, state, artifact, bundle_dir, env)
                why = self._wait_healthy(new)
            else:
                new, why = adopted, None
            steps: list[StepAnalysis] = []
            if why is None and rollout is not None and _owned(live) and rollout.steps:
                self._sync_monitoring()  # so Prometheus scrapes the canary's own /metrics too
                why = self._canary(paths, state, live, new, rollout, steps)
            if why is None:
                why = self._cut_over(paths, state, new)
            rows = tuple(a.row() for a in steps)
            if why is not None:
                return self._roll_back(paths, state, new, why, started, canary=rows)
            return self._promote(paths, state, new, started, adopted=adopted is not None, canary=rows)
        except BaseException:
            # Interrupted (run terminated, Ctrl-C, I/O error): leave the previous version serving.
            if state.get("pending"):
                self._discard_pending(paths, state)
            raise

    def status(self, service: str, environment: str) -> RuntimeStatus | None:
        state = _load_state(self._paths(service, environment))
        if not state or not state.get("live"):
            return None
        return self._status(state)

    def list(self) -> list[RuntimeStatus]:
        states = [s for s in (_load_state(_Paths(d)) for d in self._env_dirs()) if s and s.get("live")]
        if not states:
            return []
        # Health checks dominate; run them side by side so ~60 environments still answer quickly.
        with ThreadPoolExecutor(max_workers=min(16, len(states))) as pool:
            return list(pool.map(self._status, states))

    def stop(self, service: str, environment: str) -> bool:
        paths = self._paths(service, environment)
        if not paths.state.exists():
            return False
        try:
            with self._locked(paths):
                return self._stop_locked(paths, sweep=True)
        finally:
            self._sync_monitoring()

    def stop_all(self) -> int:
        """Stop every environment under root; returns how many had a process running."""
        stopped = 0
        for env_dir in self._env_dirs():
            paths = _Paths(env_dir)
            with self._locked(paths):
                stopped += self._stop_locked(paths, sweep=False)
        # One scan for anything a killed deployer started but never recorded.
        _terminate_all(_tagged(self.root), self.stop_grace_s)
        self._sync_monitoring()
        return stopped

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    def _sync_monitoring(self) -> None:
        """Prometheus' targets file follows what runs (only once `make monitoring-up` made its directory)."""
        from codemind_dagster.resources.scrape_targets import sync_targets

        sync_targets(self.root, host=self.host)

    # ---- deploy steps -----------------------------------------------------------------------

    def _ensure_proxy(self, paths: _Paths, state: dict) -> None:
        # A proxy without a metrics port predates versioned targets and would misread the target file.
        if _owned(state.get("proxy")) and state["proxy"].get("metrics_port"):
            return
        # A proxy spawned by a deployer killed before it saved the pid would hold the port.
        if state.get("proxy"):
            _terminate(state["proxy"], self.stop_grace_s, self.root)
        live = state.get("live")
        _write_target(paths, self.host, live if _owned(live) else None)
        listener = self._bind_public(state)
        # A port of its own for the proxy's metrics, so the environment's URL serves only the service.
        metrics = _listen(self.host, 0)
        try:
            record = _new_record(metrics_port=metrics.getsockname()[1])
            state["proxy"] = record
            _save_state(paths, state)
            argv = [sys.executable, "-I", str(PROXY_SCRIPT), "--fd", str(listener.fileno())]
            argv += ["--metrics-fd", str(metrics.fileno()), "--target-file", str(paths.target)]
            env = {ROOT_VAR: str(self.root), TAG_VAR: record["tag"]}
            popen = _spawn(argv, cwd=paths.dir, log=paths.logs / "proxy.log", env=env,
                           fds=(listener.fileno(), metrics.fileno()))
        finally:
            listener.close()
            metrics.close()
        _record_started(record, popen)
        _save_state(paths, state)

    def _bind_public(self, state: dict) -> socket.socket:
        port = state.get("port")
        listener = None
        if port:
            try:
                # A proxy that was just killed holds its socket until its last thread has exited.
                listener = _listen(self.host, port, retry_s=self.rebind_grace_s if state.get("published") else 0.0)
            except OSError as exc:
                if state.get("published"):
                    raise DeployError(
                        f"{state['service']}/{state['environment']}: port {port} is taken by "
                        f"{_holder(self.host, port)} ({exc}); its URL {self.url(port)} cannot be kept. "
                        f"Free the port and deploy again."
                    ) from exc
                # Nothing was ever served there, so nobody can depend on that URL yet.
        if listener is None:
            listener = self._claim_public_port(f"{state['service']}/{state['environment']}")
        state["port"] = listener.getsockname()[1]
        return listener

    def _claim_public_port(self, name: str) -> socket.socket:
        """A listener on a free public port, probing from a random start.

        Random, not derived from the name: another CODEMIND_HOME deploying the same service must not aim at the
        port of one whose proxy is restarting. The port is then kept in state.json.
        """
        lo, hi = self.public_ports
        span = hi - lo + 1
        start = secrets.randbelow(span)
        # Another environment's port stays its own while its proxy is down.
        recorded = {st.get("port") for st in (_load_state(_Paths(d)) for d in self._env_dirs()) if st}
        for i in range(span):
            port = lo + (start + i) % span
            if port in recorded:
                continue
            try:
                return _listen(self.host, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise DeployError(f"{name}: cannot listen on {self.host}:{port}: {exc}") from exc
        raise DeployError(f"{name}: every public port in {lo}-{hi} is taken; widen CODEMIND_PUBLIC_PORTS")

    def _recover(self, paths: _Paths, state: dict, artifact: str, faults: dict) -> dict | None:
        """Finish what an interrupted deploy left: adopt its new process if wanted and healthy, else remove it."""
        if state.get("retiring"):
            for record in state["retiring"]:
                _terminate(record, self.stop_grace_s, self.root)
            state["retiring"] = []
            _save_state(paths, state)
        pending = state.get("pending")
        if pending is None:
            return None
        wanted = pending["artifact"] == artifact and pending.get("faults", {}) == faults
        if wanted and _owned(pending) and _probe(self.host, pending["port"], 1.0)[0]:
            return pending
        self._discard_pending(paths, state)
        return None

    def _serves(self, paths: _Paths, state: dict, live: dict | None, artifact: str, faults: dict) -> bool:
        # The same artifact started with other fault settings is another version: a drill must get what it asks.
        if not live or live["artifact"] != artifact or live.get("faults", {}) != faults or not _owned(live):
            return False
        _write_target(paths, self.host, live)
        return _probe(self.host, state["port"], 1.0)[0]

    def _start(self, paths: _Paths, state: dict, artifact: str, bundle_dir: Path, extra_env: Mapping) -> dict:
        faults = faults_of(extra_env)
        live = state.get("live") or {}
        color = "green" if live.get("color") == "blue" else "blue"
        release = _stage_release(paths, color, bundle_dir)
        log = _rotate_log(paths.logs / f"{color}.log")
        record = _new_record(
            color=color,
            artifact=artifact,
            port=_free_port(self.host),
            phase="starting",
            bundle_dir=str(bundle_dir),
            release_dir=str(release),
            log=str(log),
            faults=faults,
        )
        # Saved before spawning: if we die right after, the tag still leads to the process.
        state["pending"] = record
        _save_state(paths, state)
        paths.data.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ} | dict(extra_env)
        env |= {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",  # so the log tail we report is complete
            "CODEMIND_DATA_DIR": str(paths.data),
            ROOT_VAR: str(self.root),
            TAG_VAR: record["tag"],
        }
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            SERVICE_APP,
            "--host",
            self.host,
            "--port",
            str(record["port"]),
        ]
        popen = _spawn(argv, cwd=release, log=log, env=env)
        _record_started(record, popen)
        _save_state(paths, state)
        return record

    def _wait_healthy(self, record: dict) -> str | None:
        """None once the new process answers /healthz, else why it never did."""
        deadline = time.monotonic() + self.health_timeout_s
        popen = _children.get(record["pid"])
        pause = 0.05
        while True:
            code = popen.poll() if popen else (None if _owned(record) else "unknown")
            if code is not None:
                return f"process exited with code {code} before becoming healthy"
            ok, detail = _probe(self.host, record["port"], 1.0)
            if ok:
                return None
            if time.monotonic() >= deadline:
                return f"not healthy after {self.health_timeout_s:g}s (last /healthz: {detail})"
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    def _canary(self, paths: _Paths, state: dict, live: dict, new: dict, rollout: Rollout,
                steps: list[StepAnalysis]) -> str | None:
        """Shift traffic to `new` step by step; None when every step passed, else why it went back to `live`."""
        from codemind_dagster.domain.canary import rollback_reason

        metrics_url = f"{self.url(state['proxy']['metrics_port'])}/metrics"
        for step in rollout.steps:
            new["phase"] = f"canary {step.weight}%"
            _save_state(paths, state)
            _write_target(paths, self.host, live, canary=new, weight=step.weight)
            try:
                verdict = rollout.analyze(step, url=self.url(state["port"]), metrics_url=metrics_url,
                                          stable=live["color"], canary=new["color"])
            except Exception as e:  # noqa: BLE001 - a canary nobody could judge is not let through
                _write_target(paths, self.host, live)
                return f"canary analysis at {step.weight}% could not run: {type(e).__name__}: {e}"
            steps.append(verdict)
            if not verdict.passed:
                # All traffic back to stable before anything else; the canary is stopped afterwards, in-flight
                # requests still finishing on it.
                _write_target(paths, self.host, live)
                return rollback_reason(new["artifact"], verdict)
        return None

    def _cut_over(self, paths: _Paths, state: dict, new: dict) -> str | None:
        new["phase"] = "cutover"
        _save_state(paths, state)
        _write_target(paths, self.host, new)
        # The proxy reads the target after accept, so these connections already reach the new version.
        detail = ""
        for _ in range(3):
            ok, detail = self._public_probe(state)
            if ok:
                return None
            time.sleep(0.2)
        return f"/healthz through {self.url(state['port'])} failed after cutover ({detail})"

    def _public_probe(self, state: dict) -> tuple[bool, str]:
        return _probe(self.host, state["port"], 1.0)

    def _promote(
        self, paths: _Paths, state: dict, new: dict, started: float, *, adopted: bool, canary: tuple = ()
    ) -> DeployOutcome:
        old = state.get("live")
        new.pop("phase", None)
        state.update(live=new, pending=None, published=True, previous_artifact=old and old["artifact"])
        # Kept in state until it is gone, so a crash while stopping it doesn't leak it.
        state["retiring"] = [old] if old else []
        _save_state(paths, state)
        if old:
            _terminate(old, self.stop_grace_s, self.root)
            state["retiring"] = []
            _save_state(paths, state)
        how = "adopted the process an interrupted deploy had started" if adopted else "started"
        replaced = f", replaced {old['artifact']}" if old else ""
        reason = f"{how} on port {new['port']} behind {self.url(state['port'])}{replaced}"
        if canary:
            shares = ", ".join(f"{r['weight']}%" for r in canary)
            reason += f" after a canary of {len(canary)} steps ({shares})"
        return self._outcome(
            state, "deployed", new["artifact"], new, old and old["artifact"], reason, started, canary
        )

    def _roll_back(self, paths: _Paths, state: dict, new: dict, why: str, started: float,
                   canary: tuple = ()) -> DeployOutcome:
        old = state.get("live")
        self._discard_pending(paths, state)
        tail = _log_tail(Path(new["log"]))
        log_part = (
            f"\n--- last lines of {new['log']} ---\n{tail}" if tail else f"\n(log {new['log']} is empty)"
        )
        if canary:
            log_part = ""  # the analysis's figures say why; the log of a version that ran fine adds nothing
        if _owned(old):
            reason = f"{new['artifact']} rolled back: {why}; {old['artifact']} keeps serving.{log_part}"
            return self._outcome(state, "rolled_back", new["artifact"], old, old["artifact"], reason, started,
                                 canary)
        if old is None:
            # Nothing ever served here: leave nothing running, keep only the port choice.
            _terminate(state["proxy"], self.stop_grace_s, self.root)
            state["proxy"] = None
            _write_target(paths, self.host, None)
            _save_state(paths, state)
            reason = f"{new['artifact']} failed: {why}; nothing is running.{log_part}"
            return self._outcome(state, "failed", new["artifact"], None, None, reason, started)
        reason = (
            f"{new['artifact']} failed: {why}; previous {old['artifact']} is not running either.{log_part}"
        )
        return self._outcome(state, "failed", new["artifact"], None, old["artifact"], reason, started)

    def _discard_pending(self, paths: _Paths, state: dict) -> None:
        live = state.get("live")
        # Point back first: an interrupted deploy may already have cut over to the process we kill.
        _write_target(paths, self.host, live if _owned(live) else None)
        _terminate(state["pending"], self.stop_grace_s, self.root)
        state["pending"] = None
        _save_state(paths, state)

    def _outcome(
        self,
        state: dict,
        outcome: str,
        artifact: str,
        serving: dict | None,
        previous: str | None,
        reason: str,
        started: float,
        canary: tuple = (),
    ) -> DeployOutcome:
        return DeployOutcome(
            outcome=outcome,
            url=self.url(state["port"]),
            artifact=artifact,
            pid=serving["pid"] if serving else None,
            previous_artifact=previous,
            reason=reason,
            duration_s=round(time.monotonic() - started, 3),
            canary=canary,
        )

    # ---- stop / status ----------------------------------------------------------------------

    def _stop_locked(self, paths: _Paths, *, sweep: bool) -> bool:
        state = _load_state(paths)
        if not state:
            return False
        # Proxy first, so no new connection is routed to a version that is shutting down.
        records = [state.get("proxy"), state.get("pending"), state.get("live"), *state.get("retiring", [])]
        stopped = False
        for record in filter(None, records):
            stopped |= _terminate(record, self.stop_grace_s, self.root if sweep else None)
        state.update(proxy=None, pending=None, live=None, retiring=[])
        _write_target(paths, self.host, None)
        _save_state(paths, state)
        return stopped

    def _status(self, state: dict) -> RuntimeStatus:
        live = state["live"]
        proc = _owned(live)
        proxy = _owned(state.get("proxy"))
        healthy = bool(proc and proxy) and _probe(self.host, state["port"], self.probe_timeout_s)[0]
        metrics_port = state["proxy"].get("metrics_port") if proxy else None
        uptime = rss = None
        if proc:
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss
                uptime = round(time.time() - live["create_time"], 3)
        return RuntimeStatus(
            service=state["service"],
            environment=state["environment"],
            url=self.url(state["port"]),
            port=state["port"],
            artifact=live["artifact"],
            pid=proc.pid if proc else None,
            healthy=healthy,
            uptime_s=uptime,
            memory_rss_bytes=rss,
            proxy_pid=proxy.pid if proxy else None,
            started_at=live["started_at"],
            metrics_url=f"{self.url(metrics_port)}/metrics" if metrics_port else None,
            faults=tuple(sorted(live.get("faults", {}).items())),
            rollout=_rollout_of(state.get("pending")),
        )

    # ---- files ------------------------------------------------------------------------------

    def _paths(self, service: str, environment: str) -> _Paths:
        for what, name in (("service", service), ("environment", environment)):
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(
                    f"{what} name {name!r} must match {_NAME.pattern} (it becomes a directory name)"
                )
        return _Paths(self.root / service / environment)

    def _env_dirs(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from sorted(p.parent for p in self.root.glob("*/*/state.json"))

    @contextlib.contextmanager
    def _locked(self, paths: _Paths) -> Iterator[None]:
        # One deploy/stop per environment at a time, across processes; released if the holder dies.
        paths.dir.mkdir(parents=True, exist_ok=True)
        with open(paths.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


# ---- state ------------------------------------------------------------------------------------


def _new_state(service: str, environment: str) -> dict:
    return {
        "version": _STATE_VERSION,
        "service": service,
        "environment": environment,
        "port": None,
        "published": False,
        "proxy": None,
        "live": None,
        "pending": None,
        "retiring": [],
        "previous_artifact": None,
    }


def _rollout_of(pending: dict | None) -> str | None:
    phase = (pending or {}).get("phase") or ""
    return f"{phase} of {pending['artifact'][:12]}" if phase.startswith("canary") and _owned(pending) else None


def _new_record(**fields) -> dict:
    return {"tag": secrets.token_hex(8), "pid": None, "create_time": None, "started_at": _now(), **fields}


def _record_started(record: dict, popen: subprocess.Popen) -> None:
    record["pid"] = popen.pid
    try:
        record["create_time"] = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        record["create_time"] = time.time()  # already gone; the record will simply never match


def _load_state(paths: _Paths) -> dict | None:
    try:
        return json.loads(paths.state.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DeployError(f"{paths.state} is not valid JSON ({exc}); fix or remove it") from exc


def _save_state(paths: _Paths, state: dict) -> None:
    _atomic_write(paths.state, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _write_target(paths: _Paths, host: str, record: dict | None, *, canary: dict | None = None,
                  weight: int = 0) -> None:
    """Point the proxy at a version's process (`host:port artifact color`), or at nothing; or split by weight."""
    # The proxy reads whitespace-separated words; an artifact name never has any, but must not break it.
    text = ""
    lines = [(record, None)] if canary is None else [(record, 100 - weight), (canary, weight)]
    for rec, share in lines:
        if not rec:
            continue
        words = [f"{host}:{rec['port']}"]
        words += ["_".join(str(rec.get(k) or "-").split()) for k in ("artifact", "color")]
        if share is not None:
            words.append(str(share))
        text += " ".join(words) + "\n"
    with contextlib.suppress(FileNotFoundError):
        if paths.target.read_text() == text:
            return
    _atomic_write(paths.target, text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stage_release(paths: _Paths, color: str, bundle_dir: Path) -> Path:
    # A private copy: the service must not break when the bundle it came from is cleaned up.
    release = paths.releases / color
    staging = paths.releases / f".{color}.staging"
    for stale in (staging, release):
        shutil.rmtree(stale, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(bundle_dir, staging, symlinks=True, ignore=ignore)
    # After the bundle's files: the platform's layer wins over a file of the same name a model may have written
    # (removed first, so a symlink of that name cannot redirect the copy).
    layer = staging / f"{SUPPORT_MODULE}.py"
    layer.unlink(missing_ok=True)
    shutil.copyfile(SUPPORT_SCRIPT, layer)
    staging.rename(release)
    return release


def faults_of(env: Mapping[str, str]) -> dict[str, str]:
    """The CODEMIND_FAULT_* settings a deploy asks for, checked; a bad value is a DeployError naming it."""
    from codemind_dagster.resources.service_support import FAULT_VARS, FaultConfigError, Faults

    try:
        Faults.from_env(env)
    except FaultConfigError as exc:
        raise DeployError(f"fault injection: {exc}") from None
    return {k: env[k] for k in FAULT_VARS if env.get(k, "").strip()}


def _rotate_log(log: Path) -> Path:
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.replace(log.with_name(log.name + ".1"))
    return log


def _log_tail(log: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 32768))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # Our own health polls would push the traceback or startup output out of the tail.
    every = text.rstrip().splitlines()
    kept = [line for line in every if '"GET /healthz ' not in line]
    omitted = len(every) - len(kept)
    note = [f"({omitted} /healthz access lines omitted)"] if omitted else []
    return "\n".join(note + kept[-lines:])


def _check_bundle(bundle_dir: Path) -> Path:
    bundle_dir = Path(bundle_dir).resolve()
    if not (bundle_dir / "service" / "app.py").is_file():
        raise DeployError(f"bundle {bundle_dir} has no service/app.py")
    return bundle_dir


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- processes --------------------------------------------------------------------------------


def _spawn(
    argv: list[str], *, cwd: Path, log: Path, env: dict, fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Own session: outlives the deployer, escapes its Ctrl-C, and is killable as one group.
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=fds,
        )
    _children[popen.pid] = popen
    return popen


def _reap_children() -> None:
    for pid, popen in list(_children.items()):
        if popen.poll() is not None:
            _children.pop(pid, None)


def _owned(record: dict | None) -> psutil.Process | None:
    """The running process a record names, or None if it exited or its pid now belongs to another one."""
    if not record or not record.get("pid"):
        return None
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        # create_time can drift with wall-clock steps; the tag in its environment is the proof.
        return proc if proc.environ().get(TAG_VAR) == record["tag"] else None
    except psutil.Error:
        return None


def _tagged(root: Path, tag: str | None = None) -> list[psutil.Process]:
    """Our processes found by their environment, for those whose pid was never recorded or has exited."""
    found = []
    uid = os.getuid()
    for proc in psutil.process_iter():
        try:
            if proc.uids().real != uid or proc.pid == os.getpid():
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get(ROOT_VAR) == str(root) and (tag is None or env.get(TAG_VAR) == tag):
            found.append(proc)
    return found


def _terminate(record: dict, grace_s: float, root: Path | None = None) -> bool:
    """Stop the process tree a record names; with `root`, find it by its tag if the pid is stale."""
    leader = _owned(record)
    if leader is None:
        tag = record.get("tag")
        return _terminate_all(_tagged(root, tag) if root and tag else [], grace_s)
    procs = [leader]
    with contextlib.suppress(psutil.Error):
        procs += leader.children(recursive=True)
    return _terminate_all(procs, grace_s, group=leader.pid)


def _terminate_all(procs: list[psutil.Process], grace_s: float, group: int | None = None) -> bool:
    """SIGTERM, then SIGKILL whatever is left after the grace period; returns whether anything ran."""
    if not procs:
        return False
    # One SIGTERM each: a second one makes uvicorn skip its graceful shutdown.
    if group is not None:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)  # also reaches children started after the snapshot
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            if group is None or os.getpgid(proc.pid) != group:
                proc.terminate()
    alive = _wait_gone(procs, grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(alive, 2.0)
    return True


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still running after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap_children()
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    # An exited process whose parent never reaps it (a detached deployer is gone) stays a zombie: count it gone.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- network ----------------------------------------------------------------------------------


def _listen(host: str, port: int, retry_s: float = 0.0) -> socket.socket:
    """A listening socket on host:port; a port in use is tried again for up to `retry_s` seconds."""
    deadline = time.monotonic() + retry_s
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Lets a restarted proxy rebind its port while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def _holder(host: str, port: int) -> str:
    """Who has host:port bound, as far as this user may see: "pid 123 (python3 …)" or "another process"."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.laddr.ip in (host, "0.0.0.0", "::") and c.pid:
                proc = psutil.Process(c.pid)
                return f"pid {c.pid} ({' '.join(proc.cmdline()[:3])[:120]}, {c.status})"
    except psutil.Error:
        pass
    return "another process"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _probe(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """GET /healthz; (True, "ok") only for 200 with {"status": "ok"}, else (False, what happened)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read(4096)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        conn.close()
    if resp.status != 200:
        return False, f"HTTP {resp.status} {body[:200].decode(errors='replace')}"
    try:
        ok = json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        ok = False
    return (True, "ok") if ok else (False, f"unexpected body {body[:200].decode(errors='replace')}")
