"""The Kubernetes objects a release becomes: pure builders, no API calls and no kubernetes import.

Every object carries the labels of resources/clusters.py (MANAGED_BY, SERVICE_LABEL, ENV_LABEL); the workload
(Deployment or Rollout), its pod template and the bundle's ConfigMap carry ARTIFACT_ANNOTATION too.

Every pod runs the platform's service layer (resources/service_support.py, the same file LocalRuntime copies
beside each release): it starts `uvicorn codemind_service:app`, which serves GET /metrics (announced to
Prometheus by the pod template's prometheus.io/* annotations) and honours CODEMIND_FAULT_* in the pod's env.

dev/staging (any environment not in `canary_environments`):
    ConfigMap <service>-<artifact[:12]>  the bundle as tar.gz in binaryData, immutable
    ConfigMap <service>-layer-<sha[:10]> the service layer (codemind_service.py), immutable; named by its own
                                         hash, so the bundle's ConfigMap stays the artifact's alone
    Deployment <service>                 RollingUpdate maxSurge 1 / maxUnavailable 0, probes on /healthz
    Service <service>                    port 80 -> 8080
production:
    ConfigMaps as above; Rollout <service> (Argo Rollouts canary, Istio host-level traffic split; the steps end in
    ANALYSIS_GATE, an open pause the product's analysis lifts);
    Services <service> (all of the app's pods, the VirtualService's host), <service>-stable, <service>-canary;
    VirtualService <service> (http route `primary`: stable/canary weights); DestinationRule <service>.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codemind_dagster.resources.clusters import ARTIFACT_ANNOTATION, ENV_LABEL, MANAGED_BY, SERVICE_LABEL
from codemind_dagster.resources.runtime import SERVICE_APP, SUPPORT_MODULE, SUPPORT_SCRIPT
from codemind_dagster.resources.service_support import METRICS_PATH

FIELD_MANAGER = "codemind"
IMAGE = "codemind/service-runtime:py3.11"
CONTAINER = "service"
CONTAINER_PORT = 8080
SERVICE_PORT = 80
BUNDLE_KEY = "bundle.tar.gz"
# A ConfigMap holds at most 1 MiB; leave room for its metadata.
MAX_BUNDLE_BYTES = 900 * 1024
BUNDLE_MOUNT = "/codemind/bundle"
LAYER_KEY = f"{SUPPORT_MODULE}.py"
LAYER_MOUNT = "/codemind/layer"
LAYER_SHA_ANNOTATION = "codemind.dev/service-layer-sha256"  # on the layer's ConfigMap
# Read by a cluster's Prometheus (kubernetes_sd pod role with the usual relabelling) to scrape every pod.
PROMETHEUS_ANNOTATIONS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(CONTAINER_PORT),
                          "prometheus.io/path": METRICS_PATH}
APP_DIR = "/codemind/app"
DATA_DIR = "/codemind/data"

# Our own bookkeeping on the objects (the cluster is the only state a KubeRuntime keeps).
TEMPLATE_HASH_ANNOTATION = "codemind.dev/template-hash"  # on the pod template: identifies a revision
SPEC_HASH_ANNOTATION = "codemind.dev/spec-hash"  # on the workload: everything we applied for the release
STABLE_TEMPLATE_ANNOTATION = "codemind.dev/stable-template"  # on a Rollout: the stable revision's template
ROLLOUT_HASH_LABEL = "rollouts-pod-template-hash"  # set by the Rollouts controller on RS, pods, Services
DEPLOYMENT_HASH_LABEL = "pod-template-hash"  # set by the Deployment controller

ROLLOUT_API = "argoproj.io/v1alpha1"
ISTIO_API = "networking.istio.io/v1"
ROUTE_NAME = "primary"

# setWeight 10 -> pause 5s -> setWeight 50 -> pause 5s -> (all steps done) 100% to the new revision.
DEFAULT_CANARY_STEPS: tuple[dict[str, Any], ...] = (
    {"setWeight": 10}, {"pause": {"duration": "5s"}}, {"setWeight": 50}, {"pause": {"duration": "5s"}},
)
# Appended to a Rollout's steps unless they already end in one: the controller holds the last weight until the
# product's analysis of that last step has passed and promotes (`kubectl argo rollouts promote`), as an Argo
# AnalysisRun would gate it, so no step reaches 100% unjudged.
ANALYSIS_GATE: dict[str, Any] = {"pause": {}}

# The fixed part of a service's environment; the same contract as LocalRuntime (CODEMIND_DATA_DIR etc.).
_FIXED_ENV = {"CODEMIND_DATA_DIR": DATA_DIR, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
_RESERVED_ENV = {"POD_IP", *_FIXED_ENV}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A DNS-1035 label short enough for `<service>-canary`, `<service>-<rs hash>-<pod suffix>` and friends.
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DURATION = re.compile(r"(\d+)(s|m|h)?")

# Unpacks the bundle with the interpreter the image runs (no tar needed), refusing paths outside APP_DIR, then
# adds the service layer. After the bundle's files, as LocalRuntime does: the platform's layer wins over a file of
# that name a model may have written (removed first, so a symlink of that name cannot redirect the copy).
_UNPACK = (
    "import os, shutil, sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data'); "
    "layer = os.path.join(sys.argv[2], os.path.basename(sys.argv[3])); "
    "os.path.lexists(layer) and os.unlink(layer); shutil.copyfile(sys.argv[3], layer)"
)
_SCRIPT = (
    "set -eu\n"
    f"python -c \"{_UNPACK}\" {BUNDLE_MOUNT}/{BUNDLE_KEY} {APP_DIR} {LAYER_MOUNT}/{LAYER_KEY}\n"
    f"cd {APP_DIR}\n"
    f"exec python -m uvicorn {SERVICE_APP} --host $(POD_IP) --port {CONTAINER_PORT}\n"
)


class ManifestError(ValueError):
    """A release cannot be expressed as Kubernetes objects (bad name, oversized bundle, bad steps)."""


@dataclass(frozen=True)
class WorkloadOptions:
    """How every release's workload is shaped; the same for every service of a runtime."""

    replicas: int = 1
    image: str = IMAGE
    progress_deadline_s: int = 120
    revision_history_limit: int = 5
    cpu_request: str = "50m"
    memory_request: str = "96Mi"
    cpu_limit: str = "1"
    memory_limit: str = "512Mi"
    termination_grace_s: int = 15
    # preStop sleep: a terminating pod keeps serving while it leaves the Service's endpoints.
    drain_s: int = 2
    canary_steps: tuple[dict[str, Any], ...] = DEFAULT_CANARY_STEPS

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 50:
            raise ManifestError(f"replicas must be 1..50, got {self.replicas}")
        if self.progress_deadline_s < 10:
            raise ManifestError(f"progress_deadline_s must be at least 10, got {self.progress_deadline_s}")
        object.__setattr__(self, "canary_steps", check_canary_steps(self.canary_steps))


@dataclass(frozen=True)
class Release:
    """One artifact of one service for one environment, in the namespace that environment maps to."""

    service: str
    environment: str
    namespace: str
    artifact: str
    env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        check_service_name(self.service)
        if not _LABEL_VALUE.fullmatch(self.environment) or not self.environment:
            raise ManifestError(f"environment {self.environment!r} is not a valid label value")
        if not re.fullmatch(r"[0-9a-f]{12,64}", self.artifact):
            raise ManifestError(f"artifact {self.artifact!r} is not a content hash (12-64 lowercase hex digits)")
        for name, value in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise ManifestError(f"environment variable name {name!r} is not valid")
            if name in _RESERVED_ENV:
                raise ManifestError(f"environment variable {name} is set by the runtime itself")
            if not isinstance(value, str):
                raise ManifestError(f"environment variable {name} must be a string, got {type(value).__name__}")

    @classmethod
    def of(cls, service: str, environment: str, namespace: str, artifact: str,
           env: Mapping[str, str] | None = None) -> Release:
        return cls(service, environment, namespace, artifact, tuple(sorted((env or {}).items())))

    @property
    def configmap(self) -> str:
        return configmap_name(self.service, self.artifact)

    def layer_configmap(self, layer: bytes) -> str:
        return layer_configmap_name(self.service, layer)


# ---- names and labels -----------------------------------------------------------------------------


def check_service_name(service: str) -> str:
    if not isinstance(service, str) or not _SERVICE_NAME.fullmatch(service):
        raise ManifestError(
            f"service name {service!r} must be a DNS-1035 label of at most 40 characters "
            "(lowercase letters, digits and '-', starting with a letter): it names Kubernetes objects"
        )
    return service


def configmap_name(service: str, artifact: str) -> str:
    return f"{service}-{artifact[:12]}"


def layer_configmap_name(service: str, layer: bytes) -> str:
    return f"{service}-layer-{hashlib.sha256(layer).hexdigest()[:10]}"


def stable_service(service: str) -> str:
    return f"{service}-stable"


def canary_service(service: str) -> str:
    return f"{service}-canary"


def selector(service: str, environment: str) -> dict[str, str]:
    """The labels that select one environment's pods of a service (immutable once a workload exists)."""
    return {SERVICE_LABEL: service, ENV_LABEL: environment}


def labels(service: str, environment: str) -> dict[str, str]:
    return {**MANAGED_BY, **selector(service, environment)}


def label_selector(values: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(values.items()))


def _meta(name: str, release: Release, *, artifact: bool = False, namespace: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(release.service, release.environment)}
    if namespace:
        meta["namespace"] = release.namespace
    if artifact:
        meta["annotations"] = {ARTIFACT_ANNOTATION: release.artifact}
    return meta


def digest(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---- the bundle -----------------------------------------------------------------------------------


def bundle_archive(bundle_dir: Path, limit: int = MAX_BUNDLE_BYTES) -> bytes:
    """The bundle as a reproducible tar.gz (same files -> same bytes); ManifestError over `limit` bytes."""
    root = Path(bundle_dir)
    if not (root / "service" / "app.py").is_file():
        raise ManifestError(f"bundle {root} has no service/app.py")
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise ManifestError(f"bundle {root} holds a symlink ({rel}); only regular files are shipped")
        if path.is_file():
            files.append((rel.as_posix(), path.read_bytes()))
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, data in files:
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    if len(data) > limit:
        raise ManifestError(
            f"bundle {root} is {len(data) / 1024:.0f} KiB as tar.gz; a ConfigMap carries at most "
            f"{limit / 1024:.0f} KiB (Kubernetes caps it at 1 MiB). Make the bundle smaller or ship it as an image."
        )
    return data


def bundle_configmap(release: Release, archive: bytes) -> dict[str, Any]:
    meta = _meta(release.configmap, release, artifact=True)
    meta["annotations"][f"{ARTIFACT_ANNOTATION}-sha256"] = hashlib.sha256(archive).hexdigest()
    return {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "immutable": True,
        "binaryData": {BUNDLE_KEY: base64.b64encode(archive).decode()},
    }


def service_layer() -> bytes:
    """The platform's service layer as shipped into every pod (the file LocalRuntime copies)."""
    return SUPPORT_SCRIPT.read_bytes()


def layer_configmap(release: Release, layer: bytes) -> dict[str, Any]:
    meta = _meta(release.layer_configmap(layer), release)
    meta["annotations"] = {LAYER_SHA_ANNOTATION: hashlib.sha256(layer).hexdigest()}
    return {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "immutable": True,
        "data": {LAYER_KEY: layer.decode()},
    }


# ---- objects --------------------------------------------------------------------------------------


def namespace(name: str, environment: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {**MANAGED_BY, ENV_LABEL: environment, "istio-injection": "enabled"}}}


def pod_template(release: Release, opts: WorkloadOptions, layer: bytes | None = None) -> dict[str, Any]:
    """The pod template of a release running `layer` (default: service_layer()), annotated with its own hash."""
    layer = service_layer() if layer is None else layer
    env: list[dict[str, Any]] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "value": v} for k, v in sorted(_FIXED_ENV.items())]
    env += [{"name": k, "value": v} for k, v in release.env]
    probe = {"httpGet": {"path": "/healthz", "port": CONTAINER_PORT, "scheme": "HTTP"}, "timeoutSeconds": 1}
    container = {
        "name": CONTAINER,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", _SCRIPT],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "env": env,
        "readinessProbe": {**probe, "periodSeconds": 1, "failureThreshold": 2, "successThreshold": 1},
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "periodSeconds": 5, "failureThreshold": 3},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {opts.drain_s}"]}}},
        "resources": {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
                      "limits": {"cpu": opts.cpu_limit, "memory": opts.memory_limit}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True},
            {"name": "layer", "mountPath": LAYER_MOUNT, "readOnly": True},
            {"name": "app", "mountPath": APP_DIR},
            {"name": "data", "mountPath": DATA_DIR},
        ],
    }
    template: dict[str, Any] = {
        "metadata": {"labels": labels(release.service, release.environment),
                     "annotations": {ARTIFACT_ANNOTATION: release.artifact, **PROMETHEUS_ANNOTATIONS}},
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "bundle", "configMap": {"name": release.configmap,
                                                 "items": [{"key": BUNDLE_KEY, "path": BUNDLE_KEY}]}},
                {"name": "layer", "configMap": {"name": release.layer_configmap(layer),
                                                "items": [{"key": LAYER_KEY, "path": LAYER_KEY}]}},
                {"name": "app", "emptyDir": {"sizeLimit": "64Mi"}},
                {"name": "data", "emptyDir": {"sizeLimit": "256Mi"}},
            ],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": opts.termination_grace_s,
        },
    }
    template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] = digest(template)
    return template


def deployment(release: Release, opts: WorkloadOptions, layer: bytes | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(release.service, release, artifact=True),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector(release.service, release.environment)},
            # The old ReplicaSet keeps serving until the new one's pods are Ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "minReadySeconds": 0,
            "progressDeadlineSeconds": opts.progress_deadline_s,
            "revisionHistoryLimit": opts.revision_history_limit,
            "template": pod_template(release, opts, layer),
        },
    }


def service(release: Release, name: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(name or release.service, release),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(release.service, release.environment),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": CONTAINER_PORT, "protocol": "TCP"}],
        },
    }


def rollout(release: Release, opts: WorkloadOptions, layer: bytes | None = None) -> dict[str, Any]:
    """An Argo Rollouts canary with Istio host-level traffic splitting between -stable and -canary."""
    return {
        "apiVersion": ROLLOUT_API, "kind": "Rollout",
        "metadata": _meta(release.service, release, artifact=True),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": selector(release.service, release.environment)},
            "progressDeadlineSeconds": opts.progress_deadline_s,
            "revisionHistoryLimit": opts.revision_history_limit,
            "template": pod_template(release, opts, layer),
            "strategy": {"canary": {
                "stableService": stable_service(release.service),
                "canaryService": canary_service(release.service),
                "trafficRouting": {"istio": {"virtualService": {"name": release.service, "routes": [ROUTE_NAME]}}},
                "steps": rollout_steps(opts.canary_steps),
            }},
        },
    }


def virtual_service(release: Release) -> dict[str, Any]:
    """All traffic to the stable Service; the Rollouts controller moves the weights during a canary."""
    def dest(host: str, weight: int) -> dict[str, Any]:
        return {"destination": {"host": host, "port": {"number": SERVICE_PORT}}, "weight": weight}

    return {
        "apiVersion": ISTIO_API, "kind": "VirtualService",
        "metadata": _meta(release.service, release),
        "spec": {
            "hosts": [release.service],
            "http": [{"name": ROUTE_NAME, "route": [dest(stable_service(release.service), 100),
                                                    dest(canary_service(release.service), 0)]}],
        },
    }


def destination_rule(release: Release) -> dict[str, Any]:
    """Traffic policy for the service's host: bounded connections and ejection of failing endpoints."""
    return {
        "apiVersion": ISTIO_API, "kind": "DestinationRule",
        "metadata": _meta(release.service, release),
        "spec": {
            "host": f"{release.service}.{release.namespace}.svc.cluster.local",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 100},
                                   "http": {"http1MaxPendingRequests": 100, "maxRequestsPerConnection": 0}},
                "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s",
                                     "maxEjectionPercent": 50},
                "tls": {"mode": "ISTIO_MUTUAL"},
            },
        },
    }


def release_objects(release: Release, opts: WorkloadOptions, archive: bytes, *, canary: bool,
                    layer: bytes | None = None) -> list[dict]:
    """Everything a release applies, in apply order: the ConfigMaps first, the workload last with SPEC_HASH_ANNOTATION."""
    layer = service_layer() if layer is None else layer
    objs: list[dict] = [bundle_configmap(release, archive), layer_configmap(release, layer)]
    if canary:
        objs += [service(release), service(release, stable_service(release.service)),
                 service(release, canary_service(release.service)),
                 destination_rule(release), virtual_service(release), rollout(release, opts, layer)]
    else:
        objs += [service(release), deployment(release, opts, layer)]
    workload = objs[-1]
    workload["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(objs)
    return objs


def spec_hash(objs: Iterable[dict]) -> str:
    """Hash of what was applied, without the ConfigMaps' contents (their names hold the artifact and layer hashes)."""
    def strip(o: dict) -> dict:
        o = copy.deepcopy(o)
        o.pop("binaryData", None)
        o.pop("data", None)
        o.get("metadata", {}).get("annotations", {}).pop(SPEC_HASH_ANNOTATION, None)
        return o

    return digest([strip(o) for o in objs])


def template_of_replicaset(rs: Mapping[str, Any]) -> dict[str, Any]:
    """A ReplicaSet's pod template without the controllers' hash labels (what `rollout undo` restores)."""
    template = copy.deepcopy(rs["spec"]["template"])
    for key in (DEPLOYMENT_HASH_LABEL, ROLLOUT_HASH_LABEL):
        template.get("metadata", {}).get("labels", {}).pop(key, None)
    return template


# ---- canary steps ---------------------------------------------------------------------------------


def check_canary_steps(steps: Iterable[Mapping[str, Any]] | str | None) -> tuple[dict[str, Any], ...]:
    """Validated Argo canary steps (setWeight N | pause {} | pause {duration}); JSON text accepted."""
    if steps is None:
        return DEFAULT_CANARY_STEPS
    if isinstance(steps, str):
        try:
            steps = json.loads(steps)
        except json.JSONDecodeError as e:
            raise ManifestError(f"canary steps: not JSON ({e})") from e
    if not isinstance(steps, list | tuple) or not steps:
        raise ManifestError("canary steps: expected a non-empty list such as [{\"setWeight\": 10}, {\"pause\": {}}]")
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, Mapping) or len(step) != 1 or next(iter(step)) not in ("setWeight", "pause"):
            raise ManifestError(f"canary step {i}: expected {{\"setWeight\": N}} or {{\"pause\": {{...}}}}, "
                                f"got {step!r}")
        if "setWeight" in step:
            w = step["setWeight"]
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 100:
                raise ManifestError(f"canary step {i}: setWeight must be an integer 0..100, got {w!r}")
            out.append({"setWeight": w})
            continue
        pause = step["pause"]
        if not isinstance(pause, Mapping) or set(pause) - {"duration"}:
            raise ManifestError(f"canary step {i}: pause takes only `duration`, got {pause!r}")
        if "duration" in pause:
            pause_seconds(pause["duration"], i)
        out.append({"pause": dict(pause)})
    return tuple(out)


def rollout_steps(steps: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The steps a Rollout gets: the configured ones, then ANALYSIS_GATE unless they end in an open pause."""
    out = [copy.deepcopy(dict(s)) for s in steps]
    if not out or out[-1] != ANALYSIS_GATE:
        out.append(copy.deepcopy(ANALYSIS_GATE))
    return out


def pause_seconds(duration: Any, index: int = 0) -> float:
    if isinstance(duration, int) and not isinstance(duration, bool) and duration >= 0:
        return float(duration)
    m = _DURATION.fullmatch(duration) if isinstance(duration, str) else None
    if not m:
        raise ManifestError(f"canary step {index}: pause duration must be seconds or like \"5s\", \"1m\", "
                            f"got {duration!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def step_summary(step: Mapping[str, Any]) -> str:
    if "setWeight" in step:
        return f"setWeight {step['setWeight']}"
    duration = step["pause"].get("duration")
    return f"pause {duration}" if duration is not None else "pause (until promoted)"
