"""Kubernetes deploy target of the k8s profile: the same interface as LocalRuntime, state kept in the cluster.

dev/staging get a Deployment rolled over with maxSurge 1 / maxUnavailable 0: the old ReplicaSet serves until
the new one's pods are Ready (readiness reported by the node's kubelet), and a revision that crashes or never
gets Ready within the health timeout is undone like `kubectl rollout undo` (the previous ReplicaSet's
template is restored). production gets an Argo Rollouts canary with Istio weights: the Rollouts controller
walks the steps, and this module does the product's side: analysis at every step, abort and undo to the stable
revision on failure or timeout. The analysis probes the canary pods' /healthz and, while it drives read-only
traffic at both revisions' pods split by the VirtualService's weights, compares the deltas of the canary's and
the stable pods' GET /metrics (domain/canary.py's `analyze`): failing early on the error rate, and in full
(error rate and p95) at the end of each step; the last step is held by the Rollout's analysis gate until judged.

Everything a deploy needs to resume lives on the objects (annotations of kube_manifests), so a deployer killed
mid-way is adopted by the next call; objects are applied with server-side apply (field manager `codemind`)
from deterministic manifests, so applying twice gives the same objects. Concurrent deploys of one
environment are serialised by the promotion records upstream, not here.

The kubernetes package is imported inside functions only: this module loads with the definitions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codemind_dagster.domain.canary import (
    AnalysisPolicy,
    ColourCounters,
    StepAnalysis,
    WindowStats,
    analyze,
    parse_counters,
    rollback_reason,
)
from codemind_dagster.resources import kube_manifests as m
from codemind_dagster.resources.clusters import (
    ARTIFACT_ANNOTATION,
    ENV_LABEL,
    MANAGED_BY,
    SERVICE_LABEL,
    ClusterMap,
)
from codemind_dagster.resources.platform import RuntimeResource
from codemind_dagster.resources.runtime import DeployError, DeployOutcome, RuntimeStatus, _probe, faults_of

# kind -> (API prefix, plural, namespaced)
_KINDS: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "Node": ("/api/v1", "nodes", False),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Service": ("/api/v1", "services", True),
    "Pod": ("/api/v1", "pods", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "ReplicaSet": ("/apis/apps/v1", "replicasets", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "Rollout": (f"/apis/{m.ROLLOUT_API}", "rollouts", True),
    "VirtualService": (f"/apis/{m.ISTIO_API}", "virtualservices", True),
    "DestinationRule": (f"/apis/{m.ISTIO_API}", "destinationrules", True),
}
# What stop() removes, workload first so no new pod is made while the rest goes.
_OWNED_KINDS = ("Rollout", "Deployment", "VirtualService", "DestinationRule", "Service", "ConfigMap")
_CRD_KINDS = {"Rollout", "VirtualService", "DestinationRule"}
_WORKLOADS = ("Deployment", "Rollout")
_FATAL_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                  "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
_REVISION = "deployment.kubernetes.io/revision"
_SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_STATE_MANAGER = "codemind-state"
_ROLLBACK_MANAGER = "codemind-rollback"
# Field managers that are the platform itself: a field any other manager owns was set by someone else.
_OWN_MANAGERS = frozenset({m.FIELD_MANAGER, _STATE_MANAGER, _ROLLBACK_MANAGER})
_ARTIFACT_FIELD = ("f:metadata", "f:annotations", f"f:{ARTIFACT_ANNOTATION}")
_REPLICAS_FIELD = ("f:spec", "f:replicas")
_IMAGE_FIELD = ("f:spec", "f:template", "f:spec", "f:containers", f'k:{{"name":"{m.CONTAINER}"}}', "f:image")


class KubeError(DeployError):
    """The Kubernetes API refused or failed a request; the message names the context and the object."""


class KubeUnreachable(KubeError):
    """No Kubernetes API answers for a context (or the kubeconfig does not have it)."""


# ---- a thin REST client over the kubernetes package's ApiClient ------------------------------------


class _Api:
    """JSON requests to one context's apiserver; errors become KubeError naming the context."""

    def __init__(self, clusters: ClusterMap, context: str, timeout_s: float):
        self.context = context
        self.kubeconfig = clusters.kubeconfig
        self.timeout_s = timeout_s
        try:
            self.client = clusters.api_client(context)
        except FileNotFoundError as e:
            raise KubeUnreachable(str(e)) from e
        except Exception as e:  # kubernetes.config.ConfigException and friends: unknown context, bad file
            raise KubeUnreachable(
                f"kubeconfig {self.kubeconfig} has no usable context {context!r} ({e}); start the clusters "
                "with `make k8s-up`, or set CODEMIND_KUBECONFIG / CODEMIND_K8S_CONTEXTS"
            ) from e
        self.host = self.client.configuration.host

    def where(self) -> str:
        return f"context {self.context!r} ({self.host}, kubeconfig {self.kubeconfig})"

    @staticmethod
    def path(kind: str, ns: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural, namespaced = _KINDS[kind]
        p = f"{prefix}/namespaces/{ns}/{plural}" if namespaced and ns else f"{prefix}/{plural}"
        if name:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    def request(self, method: str, path: str, *, body: Any = None, query: Mapping[str, Any] | None = None,
                content_type: str = "application/json", missing_ok: bool = False, text: bool = False,
                timeout: float | None = None) -> Any:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "*/*" if text else "application/json", "Content-Type": content_type}
        try:
            resp = self.client.call_api(
                path, method, query_params=list((query or {}).items()), header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=timeout or self.timeout_s,
            )
            data = resp.data
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status == 0:  # TLS failure: the client never got an HTTP answer
                raise self._unreachable(e.reason) from e
            raise KubeError(f"{method} {path} on {self.where()}: HTTP {e.status} {_api_message(e)}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise self._unreachable(e) from e
        if text:
            return data.decode("utf-8", errors="replace")
        return json.loads(data) if data else {}

    def _unreachable(self, exc: object) -> KubeUnreachable:
        return KubeUnreachable(
            f"cannot reach the Kubernetes API of context {self.context!r} at {self.host} (kubeconfig "
            f"{self.kubeconfig}): {exc}. Start the clusters with `make k8s-up`, or point CODEMIND_KUBECONFIG "
            "at a reachable cluster."
        )

    # ---- verbs ----

    def get(self, kind: str, ns: str | None, name: str) -> dict | None:
        return self.request("GET", self.path(kind, ns, name), missing_ok=True)

    def list(self, kind: str, ns: str | None = None, selector: Mapping[str, str] | None = None,
             missing_ok: bool = False) -> list[dict]:
        query = {"labelSelector": m.label_selector(selector)} if selector else {}
        found = self.request("GET", self.path(kind, ns), query=query, missing_ok=missing_ok)
        return (found or {}).get("items") or []

    def apply(self, obj: dict) -> dict:
        """Server-side apply as field manager `codemind`, taking over fields others (undo, kubectl) changed."""
        meta = obj["metadata"]
        return self.request(
            "PATCH", self.path(obj["kind"], meta.get("namespace"), meta["name"]), body=obj,
            content_type="application/apply-patch+yaml",
            query={"fieldManager": m.FIELD_MANAGER, "force": "true", "fieldValidation": "Strict"},
        )

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self.request("POST", self.path(obj["kind"], meta.get("namespace")), body=obj,
                            query={"fieldManager": m.FIELD_MANAGER, "fieldValidation": "Strict"})

    def patch(self, kind: str, ns: str, name: str, body: Any, *, json_patch: bool = False,
              sub: str | None = None, manager: str = _STATE_MANAGER) -> dict:
        ctype = "application/json-patch+json" if json_patch else "application/merge-patch+json"
        return self.request("PATCH", self.path(kind, ns, name, sub), body=body, content_type=ctype,
                            query={"fieldManager": manager, "fieldValidation": "Strict"})

    def delete(self, kind: str, ns: str | None, name: str) -> bool:
        gone = self.request("DELETE", self.path(kind, ns, name), body={"propagationPolicy": "Background"},
                            missing_ok=True)
        return gone is not None

    def log(self, ns: str, pod: str, container: str, tail: int, previous: bool = False) -> str:
        query: dict[str, Any] = {"container": container, "tailLines": tail}
        if previous:
            query["previous"] = "true"
        return self.request("GET", self.path("Pod", ns, pod, "log"), query=query, text=True)


def _api_message(e: Any) -> str:
    try:
        body = json.loads(e.body)
        return f"{body.get('reason') or e.reason}: {body.get('message')}"
    except (TypeError, ValueError, AttributeError):
        return f"{e.reason}: {str(e.body)[:500]}"


# ---- small readers of object JSON ------------------------------------------------------------------


def _ann(obj: Mapping | None, key: str) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(key)


def _label(obj: Mapping | None, key: str) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("labels", {}).get(key)


def _tpl_hash(template: Mapping | None) -> str | None:
    return _ann(template, m.TEMPLATE_HASH_ANNOTATION)


def _owned_by(obj: Mapping, owner: Mapping) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _revision(rs: Mapping) -> int:
    try:
        return int(_ann(rs, _REVISION) or 0)
    except ValueError:
        return 0


def _pod_ready(pod: Mapping) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _pod_ip(pod: Mapping) -> str | None:
    return (pod.get("status") or {}).get("podIP")


def _container_state(cs: Mapping) -> str:
    parts = []
    for key, what in (("state", "state"), ("lastState", "last state")):
        s = cs.get(key) or {}
        if "terminated" in s:
            t = s["terminated"]
            msg = f": {t['message'].strip()[:300]}" if t.get("message") else ""
            parts.append(f"{what} terminated ({t.get('reason') or 'exited'}, exit code {t.get('exitCode')}{msg})")
        elif "waiting" in s:
            w = s["waiting"]
            msg = f": {w['message'].strip()[:300]}" if w.get("message") else ""
            parts.append(f"{what} waiting ({w.get('reason') or 'unknown'}{msg})")
        elif "running" in s and key == "state":
            parts.append(f"{what} running since {s['running'].get('startedAt')}")
    parts.append(f"ready {bool(cs.get('ready'))}, restarts {cs.get('restartCount', 0)}")
    return f"container {cs.get('name')}: " + "; ".join(parts)


def _pod_state(pod: Mapping) -> str:
    st = pod.get("status") or {}
    head = f"pod {pod['metadata']['name']} ({st.get('podIP') or 'no IP'}): phase {st.get('phase') or 'unknown'}"
    conds = [f"{c['type']}={c['status']}" + (f" ({c.get('reason')}: {c['message']})" if c.get("message") else "")
             for c in st.get("conditions") or [] if c.get("type") in ("PodScheduled", "Ready")]
    if conds:
        head += ", " + ", ".join(conds)
    containers = [_container_state(cs) for cs in st.get("containerStatuses") or []]
    return "; ".join([head, *containers])


def _pod_failure(pod: Mapping, allowed_restarts: int) -> str | None:
    """Why a pod of a new revision can no longer become Ready on its own, or None."""
    st = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp"):
        return None
    if st.get("phase") == "Failed":
        return f"{_pod_state(pod)} ({st.get('reason')}: {st.get('message')})"
    for cs in st.get("containerStatuses") or []:
        state = cs.get("state") or {}
        waiting = (state.get("waiting") or {}).get("reason")
        terminated = state.get("terminated")
        if waiting in _FATAL_WAITING or cs.get("restartCount", 0) > allowed_restarts or (
                terminated and terminated.get("exitCode", 0) != 0):
            return _pod_state(pod)
    return None


def _faults_in(template: Mapping) -> tuple[tuple[str, str], ...]:
    """The CODEMIND_FAULT_* settings in a pod's (or pod template's) service container env."""
    from codemind_dagster.resources.service_support import FAULT_VARS

    for c in (template.get("spec") or {}).get("containers") or []:
        if c.get("name") == m.CONTAINER:
            return tuple(sorted((e["name"], e["value"]) for e in c.get("env") or []
                                if e.get("name") in FAULT_VARS and (e.get("value") or "").strip()))
    return ()


def _set_by(obj: Mapping, path: tuple[str, ...]) -> str:
    """Who changed a field, from managedFields: ` (set by 'kubectl-set')`, or `` when only the platform owns it."""
    owners, ours = set(), False
    for entry in obj["metadata"].get("managedFields") or []:
        node: Any = entry.get("fieldsV1") or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            if entry.get("manager") in _OWN_MANAGERS:
                ours = True
            else:
                owners.add(entry.get("manager") or "an unnamed client")
    if owners:
        return f" (set by {', '.join(repr(o) for o in sorted(owners))})"
    # The scale subresource records no manager, but the platform's manager still loses the field.
    return "" if ours else f" (changed outside the platform: field manager {m.FIELD_MANAGER!r} no longer owns it)"


def _age_s(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return round((datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds(), 3)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Measure:
    label: str
    ok: bool
    text: str


# ---- canary traffic and its figures ---------------------------------------------------------------


def traffic_paths(bundle_dir: Path) -> tuple[str, ...]:
    """Read-only routes for canary traffic: the GET collections of the bundle's service/openapi.json."""
    from codemind_dagster.resources.service_support import FAULT_EXEMPT

    try:
        spec = json.loads((bundle_dir / "service" / "openapi.json").read_text(encoding="utf-8"))
        paths = sorted(p for p, ops in (spec.get("paths") or {}).items()
                       if isinstance(ops, Mapping) and "get" in ops and "{" not in p and p not in FAULT_EXEMPT)
    except (OSError, ValueError, AttributeError):
        paths = []
    # Any path passes the fault layer: an unmatched one still shows a faulty canary (and answers 404, no error).
    return tuple(paths) or ("/",)


_TRAFFIC_QUERY = "?limit=1"  # a collection stays cheap to list; also how our requests are told apart in logs


def _get(ip: str, path: str, timeout: float) -> bool:
    """One GET; False when no answer came back (refused, reset, timed out)."""
    conn = http.client.HTTPConnection(ip, m.CONTAINER_PORT, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class _Traffic:
    """Read-only GETs at both revisions' pods, split by the canary's weight as the mesh would split them."""

    def __init__(self, paths: tuple[str, ...], rps: float, timeout_s: float, workers: int = 4):
        self.paths, self.timeout_s, self.workers = paths, timeout_s, workers
        self.interval = workers / rps
        self._lock = threading.Lock()
        self._pods: dict[str, list[str]] = {"canary": [], "stable": []}
        self._weight = 0
        self._n = 0
        self.unanswered = {"canary": 0, "stable": 0}  # requests the pods never saw, so their metrics cannot count
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def aim(self, canary: list[str], stable: list[str], weight: int) -> None:
        with self._lock:
            self._pods = {"canary": list(canary), "stable": list(stable)}
            self._weight = max(0, min(100, weight))
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, daemon=True, name=f"canary-traffic-{i}")
                             for i in range(self.workers)]
            for t in self._threads:
                t.start()

    def halt(self) -> None:
        with self._lock:
            self._pods = {"canary": [], "stable": []}

    def _next(self) -> tuple[str, str, str] | None:
        with self._lock:
            n, self._n = self._n, self._n + 1
            w = self._weight
            # Spread evenly: exactly w of every 100 requests go to the canary.
            group = "canary" if (n + 1) * w // 100 > n * w // 100 else "stable"
            pods = self._pods[group]
            if not pods:
                return None
            return group, pods[n % len(pods)], self.paths[n % len(self.paths)]

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            target = self._next()
            if target is not None:
                group, ip, path = target
                if not _get(ip, f"{path}{_TRAFFIC_QUERY}", self.timeout_s):
                    with self._lock:
                        self.unanswered[group] += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # behind (slow answers): no burst to catch up

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 1)


def _scrape(ip: str, timeout: float) -> ColourCounters:
    """A pod's request counters from its GET /metrics, without the kubelet's probes (they are not traffic)."""
    conn = http.client.HTTPConnection(ip, m.CONTAINER_PORT, timeout=timeout)
    try:
        conn.request("GET", m.PROMETHEUS_ANNOTATIONS["prometheus.io/path"], headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"GET /metrics answered HTTP {resp.status}")
    text = "\n".join(line for line in body.splitlines() if 'route="/healthz"' not in line)
    return parse_counters(text).get("", ColourCounters())


def _total(counters: Iterable[ColourCounters]) -> ColourCounters:
    out = ColourCounters()
    for c in counters:
        out.requests += c.requests
        out.errors += c.errors
        for le, n in c.buckets.items():
            out.buckets[le] = out.buckets.get(le, 0.0) + n
    return out


def _figures(w: WindowStats) -> str:
    p95 = f"{w.p95_ms:.2f} ms" if w.p95_ms is not None else "n/a"
    return f"{w.requests} requests, {w.errors} errors ({w.error_rate:.2%}), p95 {p95}"


class _TrafficAnalysis:
    """Windows of the canary's and the stable pods' /metrics deltas under driven traffic, judged by `analyze`."""

    source = "pods' /metrics"

    def __init__(self, deploy: _RolloutDeploy, paths: tuple[str, ...]):
        self.d = deploy
        self.policy = deploy.rt.analysis
        # Early verdicts look at errors only: a p95 of the first few answers of a fresh process says little.
        self.early = dataclasses.replace(self.policy, max_p95_ratio=math.inf)
        self.traffic = _Traffic(paths, deploy.rt.canary_rps, deploy.rt.probe_timeout_s * 2)
        self.paths = paths
        self._base: dict[str, ColourCounters] = {}  # pod name -> counters when the window opened
        self._now: dict[str, ColourCounters] = {}  # pod name -> counters at the last read
        self._base_unanswered = dict(self.traffic.unanswered)
        self._opened = time.monotonic()
        self._last: tuple[int, WindowStats, WindowStats | None] | None = None
        self._held: dict[int, float] = {}  # canary weight -> seconds of the window spent at it
        self.verdicts: list[StepAnalysis] = []  # every window judged, in order (the outcome's `canary` rows)
        self._weight: int | None = None
        self._seen = 0.0

    def update(self, canary: list[dict], stable: list[dict], weight: int) -> StepAnalysis | None:
        """Aims the traffic, reads the window so far; a failing verdict on the error rate alone, else None."""
        ready = [_pod_ip(p) for p in canary if _pod_ready(p) and _pod_ip(p)]
        self.traffic.aim(ready, [_pod_ip(p) for p in stable if _pod_ready(p) and _pod_ip(p)], weight)
        # The controller may pass several steps between two polls: a window is labelled by the weight it spent
        # the most time at, not by the step it was closed at.
        now = time.monotonic()
        if self._weight is not None:
            self._held[self._weight] = self._held.get(self._weight, 0.0) + now - self._seen
        # Only time the canary could be sent requests counts (not while its pod starts).
        self._weight, self._seen = (weight if ready else None), now
        self._last = self._read(canary, stable, max(self._held, key=self._held.__getitem__, default=weight))
        _, c, st = self._last
        if c.requests < self.policy.min_requests:
            return None
        verdict = analyze(weight, c, st, self.early, source=self.source)
        if verdict.passed:
            return None
        self.verdicts.append(verdict)
        return verdict

    def close(self, label: str) -> tuple[_Measure | None, StepAnalysis | None]:
        """Judges the window (errors and p95) and opens the next; (None, None) while it has too few requests:
        the window then carries on into the next step."""
        if self._last is None:
            return None, None
        w, c, st = self._last
        if c.requests < self.policy.min_requests:
            return None, None
        verdict = analyze(w, c, st, self.policy, source=self.source)
        self.verdicts.append(verdict)
        judged = self.measure(label, verdict)
        self._open()
        return judged, verdict

    def measure(self, label: str, v: StepAnalysis) -> _Measure:
        served = f"{v.served_percent:.1f}%" if v.served_percent is not None else "n/a"
        stable = _figures(v.stable) if v.stable is not None else "no figures"
        return _Measure(label, v.passed, (
            f"traffic at {v.weight}% over {time.monotonic() - self._opened:.1f}s, judged {label} (GET "
            f"{', '.join(self.paths)}; {self.source}): canary {_figures(v.canary)}; stable {stable}; the canary "
            f"answered {served}; {'passed' if v.passed else 'FAILED'}: {v.detail}"))

    def stop(self) -> None:
        self.traffic.stop()

    def pause(self) -> None:
        """No more requests until the next update (the canary is being promoted or torn down)."""
        self.traffic.halt()
        self._weight = None

    def _open(self) -> None:
        self._base = dict(self._now)
        self._base_unanswered = dict(self.traffic.unanswered)
        self._opened = time.monotonic()
        self._held = {}

    def _read(self, canary: list[dict], stable: list[dict], weight: int
              ) -> tuple[int, WindowStats, WindowStats | None]:
        timeout = self.d.rt.probe_timeout_s
        self._now = {}
        groups: dict[str, list[str]] = {"canary": [], "stable": []}
        for group, pods in (("canary", canary), ("stable", stable)):
            for p in pods:
                ip, name = _pod_ip(p), p["metadata"]["name"]
                if not ip or not _pod_ready(p):
                    continue
                try:
                    self._now[name] = _scrape(ip, timeout)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    if group == "canary":  # the platform layer serves /metrics: a canary without it is broken
                        raise _AnalysisError(f"cannot read GET /metrics of canary pod {name} ({ip}): {e}") from e
                    continue
                # A pod first seen counts from now: what it answered before (other clients, earlier deploys) is
                # not this window's.
                self._base.setdefault(name, self._now[name])
                groups[group].append(name)
        out = []
        for group in ("canary", "stable"):
            names = groups[group]
            delta = _total(self._now[n] for n in names).minus(_total(self._base[n] for n in names))
            lost = self.traffic.unanswered[group] - self._base_unanswered[group]
            out.append(WindowStats(delta.requests + lost, delta.errors + lost, delta.p95_ms))
        return weight, out[0], out[1] if groups["stable"] else None


class _AnalysisError(Exception):
    """The analysis could not be taken (a canary pod's metrics unreadable): the canary is not let through."""


# ---- the runtime -----------------------------------------------------------------------------------


class KubeRuntime:
    """Deploys bundles as Deployments (or, in `canary_environments`, Argo Rollouts) in the mapped clusters."""

    def __init__(
        self,
        clusters: ClusterMap,
        *,
        health_timeout_s: float = 120.0,
        options: m.WorkloadOptions | None = None,
        canary_environments: tuple[str, ...] = ("production",),
        canary_timeout_s: float | None = None,
        abort_timeout_s: float = 20.0,
        allowed_restarts: int = 0,
        probe_timeout_s: float = 1.0,
        poll_s: float = 0.3,
        request_timeout_s: float = 15.0,
        stop_grace_s: float = 30.0,
        log_lines: int = 30,
        analysis: AnalysisPolicy | None = None,
        canary_rps: float = 100.0,
    ) -> None:
        self.clusters = clusters
        self.health_timeout_s = health_timeout_s
        self.options = options or m.WorkloadOptions(progress_deadline_s=max(30, int(health_timeout_s) + 30))
        self.canary_environments = tuple(canary_environments)
        pauses = sum(m.pause_seconds(s["pause"].get("duration", 0)) for s in self.options.canary_steps
                     if "pause" in s)
        weights = sum(1 for s in self.options.canary_steps if "setWeight" in s)
        self.canary_timeout_s = canary_timeout_s or pauses + (weights + 1) * health_timeout_s
        self.abort_timeout_s = abort_timeout_s
        self.allowed_restarts = allowed_restarts
        self.probe_timeout_s = probe_timeout_s
        self.poll_s = poll_s
        self.request_timeout_s = request_timeout_s
        self.stop_grace_s = stop_grace_s
        self.log_lines = log_lines
        self.analysis = analysis or AnalysisPolicy()
        # At 10% a step needs min_requests canary answers within a 5 s pause: 100/s gives them in about 2 s.
        self.canary_rps = canary_rps
        self._apis: dict[str, _Api] = {}

    # ---- public API -------------------------------------------------------------------------

    def deploy(
        self,
        *,
        service: str,
        environment: str,
        artifact: str,
        bundle_dir: Path,
        env: Mapping[str, str] | None = None,
        rollout: Any = None,  # ignored: production's canary is the Rollout object's steps (options.canary_steps)
    ) -> DeployOutcome:
        """Roll `artifact` out; CODEMIND_FAULT_* in `env` reach the pods' service layer, checked before anything."""
        started = time.monotonic()
        faults_of(env or {})  # a bad fault setting is a DeployError naming it, before anything is applied
        target = self._target(environment)
        try:
            release = m.Release.of(service, environment, target.namespace, artifact, env)
            archive = m.bundle_archive(Path(bundle_dir))
        except m.ManifestError as e:
            raise DeployError(str(e)) from e
        canary = environment in self.canary_environments
        objs = m.release_objects(release, self.options, archive, canary=canary)
        if canary:
            return _RolloutDeploy(self, self._api(target.context), release, objs, started,
                                  traffic_paths(Path(bundle_dir))).run()
        return _DeploymentDeploy(self, self._api(target.context), release, objs, started).run()

    def status(self, service: str, environment: str) -> RuntimeStatus | None:
        target = self._target(environment)
        api = self._api(target.context)
        preferred = "Rollout" if environment in self.canary_environments else "Deployment"
        for kind in (preferred, *(k for k in _WORKLOADS if k != preferred)):
            wl = api.request("GET", api.path(kind, target.namespace, service), missing_ok=True)
            if wl and _label(wl, ENV_LABEL) == environment:
                return self._status_of(api, wl)
        return None

    def list(self) -> list[RuntimeStatus]:
        return self._statuses(None)

    def observe(self) -> tuple[list[RuntimeStatus], dict[str, str]]:
        """Like list(), but a context whose API does not answer is skipped: returns (statuses, {environment: why})."""
        unreachable: dict[str, str] = {}
        statuses = self._statuses(unreachable)
        return statuses, unreachable

    def _statuses(self, unreachable: dict[str, str] | None) -> list[RuntimeStatus]:
        found: dict[tuple, tuple[_Api, dict]] = {}
        for context, ns in self._places():
            try:
                api = self._api(context)
                workloads = [(kind, api.list(kind, ns, MANAGED_BY, missing_ok=kind in _CRD_KINDS))
                             for kind in _WORKLOADS]
            except KubeUnreachable as e:
                if unreachable is None:
                    raise
                for env, ctx in self.clusters.contexts.items():
                    if ctx == context and self.clusters.namespaces.get(env) == ns:
                        unreachable[env] = str(e)
                continue
            for kind, items in workloads:
                for wl in items:
                    wl.setdefault("kind", kind)
                    found.setdefault((api.host, ns, kind, wl["metadata"]["name"]), (api, wl))
        if not found:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
            return list(pool.map(lambda item: self._status_of(*item), found.values()))

    def inventory(self) -> list[dict[str, Any]]:
        """Nodes and workloads of every configured context (kube_state.py); an unreachable one is an error entry."""
        from codemind_dagster.resources.kube_state import inventory

        return inventory(self)

    def stop(self, service: str, environment: str) -> bool:
        target = self._target(environment)
        api = self._api(target.context)
        stopped = self._delete_release(api, target.namespace, m.selector(service, environment))
        self._wait_pods_gone(api, target.namespace, m.selector(service, environment))
        return stopped

    def stop_all(self) -> int:
        """Deletes every managed release in every configured namespace; returns how many workloads went.

        A context that does not answer does not keep the others running: they are stopped first, then it is raised.
        """
        stopped, unreachable = 0, []
        for context, ns in self._places():
            try:
                api = self._api(context)
                releases = set()
                for kind in _WORKLOADS:
                    for wl in api.list(kind, ns, MANAGED_BY, missing_ok=kind in _CRD_KINDS):
                        releases.add((_label(wl, SERVICE_LABEL), _label(wl, ENV_LABEL)))
            except KubeUnreachable as e:
                unreachable.append(e)
                continue
            for svc, env in sorted(r for r in releases if all(r)):
                stopped += self._delete_release(api, ns, m.selector(svc, env))
            self._wait_pods_gone(api, ns, MANAGED_BY)
        if unreachable:
            raise KubeUnreachable(f"stopped {stopped} workload(s); not reached: "
                                  + "; ".join(dict.fromkeys(str(e) for e in unreachable)))
        return stopped

    # ---- shared helpers ---------------------------------------------------------------------

    def _target(self, environment: str):
        try:
            return self.clusters.target(environment)
        except KeyError as e:
            raise DeployError(str(e.args[0]) if e.args else str(e)) from e

    def _api(self, context: str) -> _Api:
        api = self._apis.get(context)
        if api is None:
            api = self._apis[context] = _Api(self.clusters, context, self.request_timeout_s)
        return api

    def _places(self) -> list[tuple[str, str]]:
        """Every configured (context, namespace), once each."""
        return sorted({(self.clusters.contexts[e], self.clusters.namespaces[e]) for e in self.clusters.contexts
                       if e in self.clusters.namespaces})

    def _delete_release(self, api: _Api, ns: str, sel: Mapping[str, str]) -> bool:
        workloads = 0
        for kind in _OWNED_KINDS:
            for obj in api.list(kind, ns, {**MANAGED_BY, **sel}, missing_ok=kind in _CRD_KINDS):
                if api.delete(kind, ns, obj["metadata"]["name"]) and kind in _WORKLOADS:
                    workloads += 1
        return workloads > 0

    def _wait_pods_gone(self, api: _Api, ns: str, sel: Mapping[str, str]) -> None:
        """Waits (up to stop_grace_s) until the controllers and the kubelet have removed the pods."""
        deadline = time.monotonic() + self.stop_grace_s
        while api.list("Pod", ns, sel) and time.monotonic() < deadline:
            time.sleep(self.poll_s)

    def _ready_endpoints(self, api: _Api, ns: str, service: str) -> list[tuple[str, str | None]]:
        """(address, pod name) of the Service's ready endpoints, per its EndpointSlices.

        When the slices hold no endpoint at all, they are computed as the EndpointSlice controller does (the
        Service's selector, Ready pods that are not terminating): the controller cannot record a pod whose IP
        the EndpointSlice validation refuses, such as the loopback pod IPs of the local dev clusters.
        """
        out, recorded = [], False
        for es in api.list("EndpointSlice", ns, {_SERVICE_NAME_LABEL: service}):
            for ep in es.get("endpoints") or []:
                recorded = True
                cond = ep.get("conditions") or {}
                if cond.get("ready") is False or cond.get("terminating"):
                    continue
                ref = (ep.get("targetRef") or {}).get("name")
                out += [(addr, ref) for addr in ep.get("addresses") or []]
        if recorded:
            return sorted(out)
        svc = api.get("Service", ns, service)
        sel = ((svc or {}).get("spec") or {}).get("selector")
        if not sel:
            return []
        return sorted((_pod_ip(p), p["metadata"]["name"]) for p in api.list("Pod", ns, sel)
                      if _pod_ready(p) and _pod_ip(p))

    def _status_of(self, api: _Api, wl: dict) -> RuntimeStatus:
        ns, name = wl["metadata"]["namespace"], wl["metadata"]["name"]
        environment = _label(wl, ENV_LABEL) or ""
        rollout = wl.get("kind") == "Rollout" or wl.get("apiVersion", "").startswith("argoproj.io")
        svc = m.stable_service(name) if rollout else name
        pods = {p["metadata"]["name"]: p for p in api.list("Pod", ns, m.selector(name, environment))}
        wanted = _ann(wl, ARTIFACT_ANNOTATION)
        findings = self._hand_edits(api, wl)
        serving = [(addr, pods[ref]) for addr, ref in self._ready_endpoints(api, ns, svc) if ref in pods]
        # Prefer a pod of the workload's recorded artifact; during a rollover both versions may be ready.
        serving.sort(key=lambda ap: (_ann(ap[1], ARTIFACT_ANNOTATION) != wanted, ap[1]["metadata"]["name"]))
        if serving:
            addr, pod = serving[0]
            url = f"http://{addr}:{m.CONTAINER_PORT}"
            healthy = _probe(addr, m.CONTAINER_PORT, self.probe_timeout_s)[0]
            start = (pod.get("status") or {}).get("startTime")
            artifact = _ann(pod, ARTIFACT_ANNOTATION) or wanted or ""
            faults = _faults_in(pod)
        else:
            url, healthy, start, artifact = "", False, None, wanted or ""
            faults = _faults_in((wl.get("spec") or {}).get("template") or {})
        return RuntimeStatus(
            service=name, environment=environment, url=url, port=m.CONTAINER_PORT, artifact=artifact, pid=None,
            healthy=healthy, uptime_s=_age_s(start), memory_rss_bytes=None, proxy_pid=None,
            started_at=start or wl["metadata"].get("creationTimestamp") or "",
            pods_ready=sum(_pod_ready(p) for p in pods.values()), findings=findings, faults=faults,
        )

    def _hand_edits(self, api: _Api, wl: dict) -> tuple[str, ...]:
        """What differs from what the platform applies: replicas, the image, the artifact annotations, the bundle."""
        ns, name = wl["metadata"]["namespace"], wl["metadata"]["name"]
        what = f"{wl.get('kind') or 'workload'} {ns}/{name}"
        spec = wl.get("spec") or {}
        tpl = spec.get("template") or {}
        out: list[str] = []
        replicas = spec.get("replicas", 1)
        if replicas != self.options.replicas:
            out.append(f"{what} is scaled to {replicas} replica(s){_set_by(wl, _REPLICAS_FIELD)}; "
                       f"the platform applies {self.options.replicas}")
        for c in (tpl.get("spec") or {}).get("containers") or []:
            if c.get("name") == m.CONTAINER and c.get("image") != self.options.image:
                out.append(f"{what}: container {m.CONTAINER} runs image {c.get('image')}"
                           f"{_set_by(wl, _IMAGE_FIELD)}; the platform applies {self.options.image}")
        labelled, runs = _ann(wl, ARTIFACT_ANNOTATION), _ann(tpl, ARTIFACT_ANNOTATION)
        if labelled != runs:
            out.append(f"{what}: annotation {ARTIFACT_ANNOTATION} says {str(labelled)[:12]}"
                       f"{_set_by(wl, _ARTIFACT_FIELD)} but its pod template runs {str(runs)[:12]}")
        volumes = {v.get("name"): v["configMap"].get("name") for v in (tpl.get("spec") or {}).get("volumes") or []
                   if "configMap" in v}
        bundle, layer = volumes.get("bundle"), volumes.get("layer")
        if layer and api.get("ConfigMap", ns, layer) is None:
            out.append(f"ConfigMap {ns}/{layer} with the service layer is gone: new pods cannot start")
        if runs and bundle:
            if bundle != f"{name}-{runs[:12]}":
                out.append(f"{what}: the pod template mounts ConfigMap {bundle}, not the bundle of {runs[:12]}")
            cm = api.get("ConfigMap", ns, bundle)
            if cm is None:
                out.append(f"ConfigMap {ns}/{bundle} with the bundle of {runs[:12]} is gone: new pods cannot start")
            elif _ann(cm, ARTIFACT_ANNOTATION) != runs:
                out.append(f"ConfigMap {ns}/{bundle}: annotation {ARTIFACT_ANNOTATION} says "
                           f"{str(_ann(cm, ARTIFACT_ANNOTATION))[:12]}{_set_by(cm, _ARTIFACT_FIELD)}, "
                           f"the bundle it holds is {runs[:12]}")
        return tuple(out)


# ---- one deploy ------------------------------------------------------------------------------------


class _Deploy:
    """What the Deployment and the Rollout flows share: applying, pods, diagnosis, outcomes."""

    kind = ""
    # Access log lines of our own requests (probes, scrapes, canary traffic), which would push out what matters.
    own_requests: tuple[str, ...] = ('"GET /healthz ', '"GET /metrics ')

    def __init__(self, rt: KubeRuntime, api: _Api, release: m.Release, objs: list[dict], started: float):
        self.rt, self.api, self.release, self.objs, self.started = rt, api, release, objs, started
        self.ns, self.name = release.namespace, release.service
        self.workload = objs[-1]
        self.want_tpl = _tpl_hash(self.workload["spec"]["template"])
        self.want_spec = _ann(self.workload, m.SPEC_HASH_ANNOTATION)
        self.sel = m.selector(release.service, release.environment)
        self.before: dict | None = None  # the workload as this deploy found it
        self.canary_rows: tuple[dict, ...] = ()  # StepAnalysis.row() of each traffic window the canary was judged on

    # ---- objects ----

    def get_workload(self) -> dict | None:
        return self.api.get(self.kind, self.ns, self.name)

    def others_exist(self) -> bool:
        return all(self.api.get(o["kind"], self.ns, o["metadata"]["name"]) is not None for o in self.objs[:-1])

    def ensure_namespace(self) -> None:
        self.api.apply(m.namespace(self.ns, self.release.environment))

    def ensure_configmaps(self) -> None:
        """The release's ConfigMaps (bundle, service layer), which lead the objects."""
        for obj in self.objs:
            if obj["kind"] == "ConfigMap":
                self.ensure_configmap(obj)

    def ensure_configmap(self, cm: dict) -> None:
        """Created once per content (it is immutable); an existing one must hold the same bundle or layer."""
        key = m.LAYER_SHA_ANNOTATION if _ann(cm, m.LAYER_SHA_ANNOTATION) else f"{ARTIFACT_ANNOTATION}-sha256"
        what = "service layer" if key == m.LAYER_SHA_ANNOTATION else "bundle"
        want = _ann(cm, key)
        for _ in range(2):
            have = self.api.get("ConfigMap", self.ns, cm["metadata"]["name"])
            if have is not None:
                if _ann(have, key) != want:
                    raise DeployError(
                        f"ConfigMap {self.ns}/{cm['metadata']['name']} on {self.api.where()} exists with another "
                        f"{what} (sha256 {_ann(have, key)}, want {want}); delete it and deploy again"
                    )
                return
            with contextlib.suppress(KubeError):  # 409: created meanwhile; compared on the next pass
                self.api.create(cm)
                return
        raise DeployError(f"ConfigMap {self.ns}/{cm['metadata']['name']} could not be created")

    def replicasets(self, wl: dict | None) -> list[dict]:
        if wl is None:
            return []
        return [rs for rs in self.api.list("ReplicaSet", self.ns) if _owned_by(rs, wl)]

    def pods_of(self, rs: dict | None) -> list[dict]:
        if rs is None:
            return []
        sel = (rs["spec"].get("selector") or {}).get("matchLabels") or {}
        return sorted((p for p in self.api.list("Pod", self.ns, sel)
                       if _owned_by(p, rs) and not p["metadata"].get("deletionTimestamp")),
                      key=lambda p: p["metadata"]["name"])

    def configmaps_in_use(self, templates: list[dict]) -> set[str]:
        names = set()
        for t in templates:
            for v in (t.get("spec") or {}).get("volumes") or []:
                if "configMap" in v:
                    names.add(v["configMap"]["name"])
        return names

    def collect_garbage(self) -> None:
        """Deletes this release's ConfigMaps that no revision of the workload refers to any more."""
        wl = self.get_workload()
        if wl is None:
            return
        templates = [wl["spec"]["template"]] + [rs["spec"]["template"] for rs in self.replicasets(wl)]
        used = self.configmaps_in_use(templates)
        for cm in self.api.list("ConfigMap", self.ns, {**MANAGED_BY, **self.sel}):
            if cm["metadata"]["name"] not in used:
                self.api.delete("ConfigMap", self.ns, cm["metadata"]["name"])

    def restored_spec_hash(self, template: dict) -> str:
        """What the workload's spec hash was while it ran `template` (so that revision counts as unchanged)."""
        if self.before and _tpl_hash(self.before["spec"]["template"]) == _tpl_hash(template):
            return _ann(self.before, m.SPEC_HASH_ANNOTATION) or "rolled-back"
        return "rolled-back"

    def first_deploy(self, live: dict | None, rsets: list[dict]) -> bool:
        """Nothing of this release ever served: no other revision, and no pod of this one was available."""
        if live is None:
            return True
        return not any(_tpl_hash(rs["spec"]["template"]) != self.want_tpl
                       or (rs.get("status") or {}).get("availableReplicas", 0) > 0 for rs in rsets)

    def delete_everything(self) -> None:
        self.rt._delete_release(self.api, self.ns, self.sel)

    # ---- pods ----

    def probe_pods(self, pods: list[dict]) -> tuple[bool, str]:
        """Every pod Ready and answering GET /healthz with {"status": "ok"} on its own IP."""
        if not pods:
            return False, "no pods"
        details, ok = [], True
        for p in pods:
            ip = _pod_ip(p)
            if not _pod_ready(p) or not ip:
                ok = False
                details.append(f"{p['metadata']['name']} not Ready")
                continue
            good, detail = _probe(ip, m.CONTAINER_PORT, self.rt.probe_timeout_s)
            ok &= good
            details.append(f"{ip} {detail}")
        return ok, "; ".join(details)

    def first_failure(self, pods: list[dict]) -> tuple[str, dict] | None:
        for p in pods:
            why = _pod_failure(p, self.rt.allowed_restarts)
            if why:
                return why, p
        return None

    def log_tail(self, pod: dict) -> str:
        name = pod["metadata"]["name"]
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        restarted = any(cs.get("restartCount", 0) > 0 for cs in statuses)
        started = any(not (cs.get("state") or {}).get("waiting") or (cs.get("lastState") or {}).get("terminated")
                      or cs.get("restartCount", 0) > 0 for cs in statuses)
        if not started:
            return "(no container has started yet, so there is no log)"
        text = ""
        for previous in (False, True) if restarted else (False,):
            try:
                text = self.api.log(self.ns, name, m.CONTAINER, tail=200, previous=previous)
            except KubeError as e:
                text = f"(log unavailable: {e})"
            if text.strip() and not text.startswith("(log unavailable"):
                break
        every = text.rstrip().splitlines()
        kept = [line for line in every if not any(mark in line for mark in self.own_requests)]
        omitted = len(every) - len(kept)
        note = [f"({omitted} access lines of the platform's own requests omitted)"] if omitted else []
        return "\n".join(note + kept[-self.rt.log_lines:]) or "(the log is empty)"

    def diagnose(self, pods: list[dict]) -> str:
        """The failing pods' state and last log lines, read before any rollback removes them."""
        parts = []
        for pod in pods[:2]:
            fresh = self.api.get("Pod", self.ns, pod["metadata"]["name"]) or pod
            parts.append(f"\n--- {_pod_state(fresh)} ---\n--- last log lines of pod {pod['metadata']['name']} "
                         f"(kubectl logs -n {self.ns} {pod['metadata']['name']}) ---\n{self.log_tail(fresh)}")
        return "".join(parts) if parts else "\n(no pod of the new revision was created)"

    def in_service(self, svc: str, pods: list[dict]) -> tuple[bool, str]:
        """Every pod is a ready endpoint of the Service (its EndpointSlices), so its URL resolves to them."""
        ready = {a for a, _ in self.rt._ready_endpoints(self.api, self.ns, svc)}
        missing = [_pod_ip(p) for p in pods if _pod_ip(p) not in ready]
        return (not missing, f"not yet ready endpoints of Service {svc}: {', '.join(map(str, missing))}")

    def url_of(self, svc: str, pods: list[dict]) -> str:
        ips = {_pod_ip(p) for p in pods}
        endpoints = self.rt._ready_endpoints(self.api, self.ns, svc)
        chosen = next((a for a, _ in endpoints if a in ips), None) or (endpoints[0][0] if endpoints else None)
        chosen = chosen or next((_pod_ip(p) for p in pods if _pod_ip(p)), None)
        return f"http://{chosen}:{m.CONTAINER_PORT}" if chosen else ""

    def outcome(self, outcome: str, url: str, previous: str | None, reason: str) -> DeployOutcome:
        return DeployOutcome(outcome=outcome, url=url, artifact=self.release.artifact, pid=None,
                             previous_artifact=previous, reason=reason,
                             duration_s=round(time.monotonic() - self.started, 3), canary=self.canary_rows)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"

    def sleep(self) -> None:
        time.sleep(self.rt.poll_s)


class _DeploymentDeploy(_Deploy):
    """dev/staging: a RollingUpdate the Deployment controller performs and the kubelet's readiness gates."""

    kind = "Deployment"

    def run(self) -> DeployOutcome:
        live = self.before = self.get_workload()
        art = self.release.artifact
        if live and _ann(live, m.SPEC_HASH_ANNOTATION) == self.want_spec \
                and _tpl_hash(live["spec"]["template"]) == self.want_tpl and self.others_exist():
            state = self.state(live)
            if state["complete"]:
                ok, detail = self.probe_pods(state["pods"])
                if ok:
                    return self.outcome("unchanged", self.url_of(self.name, state["pods"]), art,
                                        f"{art} is already live and healthy in {self.ns} ({detail})")
        adopted = live is not None and _tpl_hash(live["spec"]["template"]) == self.want_tpl
        before = self.replicasets(live)
        previous = self.serving_revision(before)
        prev_art = _ann(previous["spec"]["template"], ARTIFACT_ANNOTATION) if previous else None
        first = self.first_deploy(live, before)

        self.ensure_namespace()
        self.ensure_configmaps()
        for obj in self.objs:
            if obj["kind"] != "ConfigMap":
                self.api.apply(obj)

        ok, why, pods = self.wait(self.want_tpl, time.monotonic() + self.rt.health_timeout_s)
        if ok:
            self.collect_garbage()
            how = "adopted the rollout an interrupted deploy had started" if adopted else "rolled out"
            replaced = f", replacing {prev_art}" if prev_art and prev_art != art else ""
            return self.outcome("deployed", self.url_of(self.name, pods), prev_art,
                                f"{how} {art} in {self.ns} on {self.api.context} in {self.elapsed()}{replaced}")
        why += self.diagnose(pods)
        if previous is None:
            if first:
                self.delete_everything()
                return self.outcome("failed", "", None, f"{art} failed: {why}\nNothing was serving before; "
                                    f"its objects in {self.ns} were removed, so nothing is running.")
            return self.outcome("failed", "", prev_art, f"{art} failed: {why}\nNo previous revision is "
                                "available to roll back to: nothing is serving.")
        return self.roll_back(previous, prev_art, why)

    def state(self, d: dict) -> dict:
        """Whether the rollout of the template `d` holds is complete, and the pods of its ReplicaSet."""
        want = _tpl_hash(d["spec"]["template"])
        rsets = [rs for rs in self.replicasets(d) if _tpl_hash(rs["spec"]["template"]) == want]
        new = max(rsets, key=_revision, default=None)
        pods = self.pods_of(new)
        replicas = d["spec"].get("replicas", 1)
        st = d.get("status") or {}
        complete = (new is not None and st.get("observedGeneration", 0) >= d["metadata"]["generation"]
                    and st.get("updatedReplicas", 0) == replicas and st.get("replicas", 0) == replicas
                    and st.get("availableReplicas", 0) >= replicas
                    and sum(_pod_ready(p) for p in pods) >= replicas)
        return {"complete": complete, "pods": pods, "rs": new, "status": st}

    def serving_revision(self, rsets: list[dict]) -> dict | None:
        """The revision to return to: the newest one with available pods other than the wanted template."""
        others = [rs for rs in rsets if _tpl_hash(rs["spec"]["template"]) != self.want_tpl]
        others.sort(key=lambda rs: ((rs.get("status") or {}).get("availableReplicas", 0) > 0, _revision(rs)),
                    reverse=True)
        if others and (others[0].get("status") or {}).get("availableReplicas", 0) > 0:
            return others[0]
        return None

    def wait(self, tpl: str, deadline: float) -> tuple[bool, str, list[dict]]:
        """Until the Deployment runs template `tpl` on Ready pods that answer /healthz, or why not."""
        last, pods = "no status yet", []
        while True:
            d = self.get_workload()
            if d is None:
                return False, "the Deployment disappeared while rolling out", pods
            if _tpl_hash(d["spec"]["template"]) != tpl:
                return False, "the Deployment's template was changed by someone else meanwhile", pods
            state = self.state(d)
            pods = state["pods"]
            failure = self.first_failure(pods)
            if failure:
                return False, f"a pod of the new revision failed: {failure[0]}", [failure[1]]
            for c in state["status"].get("conditions") or []:
                if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
                    return False, f"the Deployment exceeded its progress deadline: {c.get('message')}", pods
            if state["complete"]:
                ok, last = self.probe_pods(pods)
                if ok:
                    ok, last = self.in_service(self.name, pods)
                if ok:
                    return True, "", pods
            else:
                st = state["status"]
                last = (f"updated {st.get('updatedReplicas', 0)}, available {st.get('availableReplicas', 0)}, "
                        f"total {st.get('replicas', 0)} of {d['spec'].get('replicas', 1)}; "
                        + ("; ".join(_pod_state(p) for p in pods) or "no pod yet"))
            if time.monotonic() >= deadline:
                return False, f"not Ready after {self.rt.health_timeout_s:g}s ({last})", pods
            self.sleep()

    def roll_back(self, previous: dict, prev_art: str | None, why: str) -> DeployOutcome:
        """`kubectl rollout undo`: the previous ReplicaSet's template goes back into the Deployment."""
        template = m.template_of_replicaset(previous)
        self.api.patch(self.kind, self.ns, self.name, [
            {"op": "replace", "path": "/spec/template", "value": template},
            {"op": "add", "path": _ann_path(ARTIFACT_ANNOTATION), "value": prev_art or ""},
            {"op": "add", "path": _ann_path(m.SPEC_HASH_ANNOTATION), "value": self.restored_spec_hash(template)},
        ], json_patch=True, manager=_ROLLBACK_MANAGER)
        ok, why_back, pods = self.wait(_tpl_hash(template) or "", time.monotonic() + self.rt.health_timeout_s)
        self.collect_garbage()
        art = self.release.artifact
        if ok:
            return self.outcome("rolled_back", self.url_of(self.name, pods), prev_art,
                                f"{art} rolled back: {why}\n{prev_art} keeps serving (revision "
                                f"{_revision(previous)} restored, like `kubectl rollout undo`).")
        return self.outcome("failed", "", prev_art, f"{art} failed: {why}\nThe rollback to {prev_art} did not "
                            f"become healthy either: {why_back}")


class _RolloutDeploy(_Deploy):
    """production: the Rollouts controller walks the canary steps; we analyse, abort and undo."""

    kind = "Rollout"

    def __init__(self, rt: KubeRuntime, api: _Api, release: m.Release, objs: list[dict], started: float,
                 paths: tuple[str, ...] = ("/",)):
        super().__init__(rt, api, release, objs, started)
        self.paths = paths  # what the canary traffic requests
        self.own_requests = (*self.own_requests, *(f'"GET {p}{_TRAFFIC_QUERY} ' for p in paths))

    def run(self) -> DeployOutcome:
        live = self.before = self.get_workload()
        art = self.release.artifact
        stable_rs = self.stable_rs(live)
        if live and stable_rs and _ann(live, m.SPEC_HASH_ANNOTATION) == self.want_spec and self.settled(live) \
                and _tpl_hash(stable_rs["spec"]["template"]) == self.want_tpl and self.others_exist():
            pods = self.pods_of(stable_rs)
            ok, detail = self.probe_pods(pods)
            if ok:
                return self.outcome("unchanged", self.url_of(m.stable_service(self.name), pods), art,
                                    f"{art} is already the stable revision in {self.ns} ({detail})")
        stable_tpl = self.stable_template(live, stable_rs)
        prev_art = _ann(stable_tpl, ARTIFACT_ANNOTATION) if stable_tpl else None
        has_previous = stable_tpl is not None and _tpl_hash(stable_tpl) != self.want_tpl
        first = self.first_deploy(live, self.replicasets(live))
        adopted = live is not None and _tpl_hash(live["spec"]["template"]) == self.want_tpl
        if live and stable_tpl and _ann(live, m.STABLE_TEMPLATE_ANNOTATION) != _dump(stable_tpl):
            self.remember_stable(stable_tpl)  # before the template changes: the undo must find it after a crash

        self.ensure_namespace()
        self.ensure_configmaps()
        for obj in self.objs[:-1]:
            if obj["kind"] == "ConfigMap":
                continue
            if obj["kind"] == "VirtualService":
                self.ensure_virtual_service(obj)
            else:
                self.api.apply(obj)
        self.api.apply(self.workload)
        if adopted and (live.get("status") or {}).get("abort"):
            # Aborted by a deploy that died before its undo: retry the canary (`kubectl argo rollouts retry`).
            self.api.patch(self.kind, self.ns, self.name, {"status": {"abort": False}}, sub="status")

        ok, why, measures, pods = self.watch(time.monotonic() + self.rt.canary_timeout_s)
        evidence = "\n".join(f"  {x.text}" for x in measures) or "  (no step was analysed)"
        if ok:
            self.remember_stable((self.get_workload() or self.workload)["spec"]["template"])
            self.collect_garbage()
            how = "adopted the canary an interrupted deploy had started" if adopted else "canary completed"
            replaced = f", replacing {prev_art}" if prev_art and prev_art != art else ""
            return self.outcome("deployed", self.url_of(m.stable_service(self.name), pods), prev_art,
                                f"{how}: {art} is stable in {self.ns} after {self.elapsed()}{replaced}; "
                                f"analysis:\n{evidence}")
        why = f"{why}\nanalysis:\n{evidence}{self.diagnose(pods)}"
        if not has_previous:
            if first:
                self.delete_everything()
                return self.outcome("failed", "", None, f"{art} failed: {why}\nNothing was stable before; "
                                    f"its objects in {self.ns} were removed, so nothing is running.")
            return self.outcome("failed", "", prev_art, f"{art} failed: {why}\nThere is no other stable "
                                "revision to roll back to.")
        return self.abort_and_undo(stable_tpl, prev_art, why)

    # ---- reading the Rollout ----

    def stable_rs(self, ro: dict | None) -> dict | None:
        h = ((ro or {}).get("status") or {}).get("stableRS")
        if not ro or not h:
            return None
        rs = self.api.get("ReplicaSet", self.ns, f"{self.name}-{h}")
        return rs if rs and _owned_by(rs, ro) else None

    @staticmethod
    def settled(ro: dict) -> bool:
        st = ro.get("status") or {}
        return (str(st.get("observedGeneration")) == str(ro["metadata"]["generation"])
                and st.get("phase") == "Healthy" and not st.get("abort")
                and bool(st.get("stableRS")) and st.get("stableRS") == st.get("currentPodHash"))

    def stable_template(self, ro: dict | None, stable_rs: dict | None) -> dict | None:
        """The stable revision's template exactly as the Rollout held it, so the controller's hash matches."""
        if not ro or not stable_rs:
            return None
        want = _tpl_hash(stable_rs["spec"]["template"])
        if self.settled(ro) and _tpl_hash(ro["spec"]["template"]) == want:
            return ro["spec"]["template"]
        with contextlib.suppress(TypeError, ValueError):
            kept = json.loads(_ann(ro, m.STABLE_TEMPLATE_ANNOTATION) or "")
            if _tpl_hash(kept) == want:
                return kept
        return m.template_of_replicaset(stable_rs)  # best effort: the ReplicaSet's copy

    def remember_stable(self, template: dict) -> None:
        self.api.patch(self.kind, self.ns, self.name,
                       {"metadata": {"annotations": {m.STABLE_TEMPLATE_ANNOTATION: _dump(template)}}})

    def ensure_virtual_service(self, vs: dict) -> None:
        """Created once; afterwards its weights belong to the Rollouts controller (re-applied only if reshaped)."""
        have = self.api.get("VirtualService", self.ns, vs["metadata"]["name"])
        if have is None or _route_shape(have) != _route_shape(vs):
            self.api.apply(vs)

    def weights(self) -> tuple[int | None, int | None]:
        vs = self.api.get("VirtualService", self.ns, self.name) or {}
        stable = canary = None
        for route in (vs.get("spec") or {}).get("http") or []:
            if route.get("name") != m.ROUTE_NAME:
                continue
            for d in route.get("route") or []:
                host = d.get("destination", {}).get("host")
                if host == m.stable_service(self.name):
                    stable = d.get("weight", 0)
                elif host == m.canary_service(self.name):
                    canary = d.get("weight", 0)
        return stable, canary

    def analyse(self, label: str, pods: list[dict]) -> _Measure:
        ok, detail = self.probe_pods(pods)
        stable, canary = self.weights()
        ready = sum(_pod_ready(p) for p in pods)
        text = (f"{label} at {self.elapsed()}: VirtualService weights stable {stable} / canary {canary}; "
                f"pods of the new revision Ready {ready}/{len(pods)}; /healthz: {detail}")
        return _Measure(label, ok, text)

    # ---- the canary ----

    def watch(self, deadline: float) -> tuple[bool, str, list[_Measure], list[dict]]:
        """Follows the controller through the steps, analysing at each one, until Healthy or a verdict."""
        traffic = _TrafficAnalysis(self, self.paths)
        try:
            return self._watch(deadline, traffic)
        except _AnalysisError as e:
            return False, f"canary analysis could not run: {e}", [], []
        finally:
            traffic.stop()
            self.canary_rows = tuple(v.row() for v in traffic.verdicts)

    def _watch(self, deadline: float, traffic: _TrafficAnalysis) -> tuple[bool, str, list[_Measure], list[dict]]:
        steps = self.workload["spec"]["strategy"]["canary"]["steps"]
        art = self.release.artifact
        measures: list[_Measure] = []
        seen_step, pods, last = None, [], "the controller has not picked up the new template yet"
        judged_step = None  # the step whose arrival closed a traffic window with enough requests
        while True:
            ro = self.get_workload()
            if ro is None:
                return False, "the Rollout disappeared during the canary", measures, pods
            st = ro.get("status") or {}
            h = st.get("currentPodHash")
            rs = self.api.get("ReplicaSet", self.ns, f"{self.name}-{h}") if h else None
            if _tpl_hash(ro["spec"]["template"]) != self.want_tpl:
                return False, "the Rollout's template was changed by someone else meanwhile", measures, pods
            current = (str(st.get("observedGeneration")) == str(ro["metadata"]["generation"]) and rs is not None
                       and _tpl_hash(rs["spec"]["template"]) == self.want_tpl)
            if current:
                pods = self.pods_of(rs)
                failure = self.first_failure(pods)
                if failure:
                    return False, f"a pod of the new revision failed: {failure[0]}", measures, [failure[1]]
                phase, step = st.get("phase"), st.get("currentStepIndex")
                last = f"phase {phase}, step {step}/{len(steps)}, {st.get('message') or 'no message'}"
                stable_hash = st.get("stableRS")
                # A canary against a stable revision (a first revision skips the steps, as in Argo).
                canary_on = stable_hash not in (None, h)
                # Past the last step (the gate lifted) the controller is promoting: nothing is left to judge.
                in_steps = canary_on and phase != "Healthy" and isinstance(step, int) and step < len(steps)
                if in_steps:
                    stable_pods = self.pods_of(self.api.get("ReplicaSet", self.ns, f"{self.name}-{stable_hash}"))
                    early = traffic.update(pods, stable_pods, self.weights()[1] or 0)
                    if early is not None:
                        x = traffic.measure("as the requests came in (error rate only)", early)
                        return False, rollback_reason(art, early), [*measures, x], pods
                else:
                    traffic.pause()
                if stable_hash == h and phase == "Healthy":
                    done = self.analyse("promoted (100% to the new revision)", pods)
                    listed, why_not = self.in_service(m.stable_service(self.name), pods)
                    if done.ok and listed:
                        return True, "", [*measures, done], pods
                    last = done.text if not done.ok else why_not
                elif isinstance(step, int) and step != seen_step and canary_on:
                    seen_step = step
                    if step >= 1:
                        label = f"after step {step - 1} ({m.step_summary(steps[step - 1])})"
                        x = self.analyse(label, pods)
                        measures.append(x)
                        if not x.ok:
                            return False, f"analysis failed {x.label}", measures, pods
                        # The window since the last verdict; one with too few requests carries on into the next.
                        judged, verdict = traffic.close(label) if in_steps else (None, None)
                        if judged is not None:
                            measures.append(judged)
                            judged_step = step
                            if not judged.ok:
                                return False, rollback_reason(art, verdict), measures, pods
                waits_for_us = (isinstance(step, int) and step < len(steps) and "pause" in steps[step]
                                and "duration" not in steps[step]["pause"])
                if phase == "Paused" and st.get("pauseConditions") and waits_for_us:
                    label = f"paused at step {step}"
                    judged, verdict = (None, None) if judged_step == step else traffic.close(label)
                    if judged_step == step or judged is not None:
                        x = self.analyse(label, pods)
                        measures += [x] if judged is None else [x, judged]
                        if not x.ok:
                            return False, f"analysis failed {x.label}", measures, pods
                        if judged is not None and not judged.ok:
                            return False, rollback_reason(art, verdict), measures, pods
                        # `kubectl argo rollouts promote`: the analysis passed, resume the steps.
                        self.api.patch(self.kind, self.ns, self.name, {"status": {"pauseConditions": None}},
                                       sub="status")
                        judged_step = None
                    else:
                        last = f"paused at step {step}, waiting for {traffic.policy.min_requests} canary requests"
                if phase == "Degraded":
                    return False, f"the Rollout is Degraded: {st.get('message')}", measures, pods
            if time.monotonic() >= deadline:
                return False, f"not Healthy after {self.rt.canary_timeout_s:g}s ({last})", measures, pods
            self.sleep()

    def abort_and_undo(self, stable_tpl: dict, prev_art: str | None, why: str) -> DeployOutcome:
        """`kubectl argo rollouts abort`, then `undo`: back to the stable revision's template."""
        art = self.release.artifact
        self.api.patch(self.kind, self.ns, self.name, {"status": {"abort": True}}, sub="status")
        deadline = time.monotonic() + self.rt.abort_timeout_s
        aborted = "no answer to the abort"
        while time.monotonic() < deadline:
            st = (self.get_workload() or {}).get("status") or {}
            stable, canary = self.weights()
            if st.get("phase") == "Degraded" and not canary:
                aborted = f"aborted: weights stable {stable} / canary {canary}, {st.get('message')}"
                break
            self.sleep()
        self.api.patch(self.kind, self.ns, self.name, [
            {"op": "replace", "path": "/spec/template", "value": stable_tpl},
            {"op": "add", "path": _ann_path(ARTIFACT_ANNOTATION), "value": prev_art or ""},
            {"op": "add", "path": _ann_path(m.SPEC_HASH_ANNOTATION), "value": self.restored_spec_hash(stable_tpl)},
        ], json_patch=True, manager=_ROLLBACK_MANAGER)
        want = _tpl_hash(stable_tpl)
        deadline = time.monotonic() + self.rt.health_timeout_s
        last = "not settled"
        while True:
            ro = self.get_workload() or {}
            rs = self.stable_rs(ro)
            if ro and self.settled(ro) and rs and _tpl_hash(rs["spec"]["template"]) == want:
                pods = self.pods_of(rs)
                ok, last = self.probe_pods(pods)
                if ok:
                    ok, last = self.in_service(m.stable_service(self.name), pods)
                if ok:
                    self.collect_garbage()
                    stable, canary = self.weights()
                    return self.outcome(
                        "rolled_back", self.url_of(m.stable_service(self.name), pods), prev_art,
                        f"{art} rolled back: {why}\n{aborted}; {prev_art} is stable again and keeps serving "
                        f"(weights stable {stable} / canary {canary}).")
            elif ro:
                st = ro.get("status") or {}
                last = f"phase {st.get('phase')}, abort {st.get('abort')}, {st.get('message')}"
            if time.monotonic() >= deadline:
                return self.outcome("failed", "", prev_art, f"{art} failed: {why}\n{aborted}; the undo to "
                                    f"{prev_art} did not settle in {self.rt.health_timeout_s:g}s ({last})")
            self.sleep()


def _route_shape(vs: Mapping) -> Any:
    spec = vs.get("spec") or {}
    return (spec.get("hosts"), [(r.get("name"), [d.get("destination") for d in r.get("route") or []])
                                for r in spec.get("http") or []])


def _ann_path(key: str) -> str:
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---- the Dagster resource --------------------------------------------------------------------------


class KubeRuntimeResource(RuntimeResource):  # a RuntimeResource, so assets typed with it take this one
    """The deploy target of the k8s profile: Deployments in dev/staging, an Argo Rollouts canary in production.

    The kubeconfig and the JSON maps environment -> context / namespace are those of settings
    (CODEMIND_KUBECONFIG, CODEMIND_K8S_CONTEXTS, CODEMIND_K8S_NAMESPACES) over resources/clusters.py's defaults.
    """

    root: str = ""  # unused: the clusters hold every deployment's state
    kubeconfig_path: str
    k8s_contexts: str | None = None
    k8s_namespaces: str | None = None
    replicas: int = 1
    # JSON list of Argo canary steps, e.g. [{"setWeight": 20}, {"pause": {"duration": "30s"}}]
    canary_steps_json: str | None = None
    canary_environments: list[str] = ["production"]  # noqa: RUF012 - pydantic copies field defaults
    canary_timeout_s: float | None = None

    def runtime(self) -> KubeRuntime:  # type: ignore[override]
        clusters = ClusterMap.parse(Path(self.kubeconfig_path), self.k8s_contexts, self.k8s_namespaces)
        try:
            options = m.WorkloadOptions(replicas=self.replicas,
                                        progress_deadline_s=max(30, int(self.health_timeout_s) + 30),
                                        canary_steps=m.check_canary_steps(self.canary_steps_json))
        except m.ManifestError as e:
            raise DeployError(f"runtime resource: {e}") from e
        return KubeRuntime(clusters, health_timeout_s=self.health_timeout_s, options=options,
                           canary_environments=tuple(self.canary_environments),
                           canary_timeout_s=self.canary_timeout_s)
