"""What the Kubernetes API of every configured context holds: nodes, and the workloads of the mapped namespaces.

The inventory is read-only and never raises for one context: a context whose API does not answer (or that the
kubeconfig lacks) becomes an entry with `reachable: False` and the error, so the other clusters still show.
The kubernetes package is imported only through kube_runtime's client, inside calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from codemind_dagster.resources import kube_manifests as m
from codemind_dagster.resources.clusters import ARTIFACT_ANNOTATION, ENV_LABEL, MANAGED_BY, SERVICE_LABEL

if TYPE_CHECKING:
    from codemind_dagster.resources.kube_runtime import KubeRuntime, _Api

_DEPLOYMENT_REVISION = "deployment.kubernetes.io/revision"
_ROLLOUT_REVISION = "rollout.argoproj.io/revision"


def inventory(rt: KubeRuntime) -> list[dict[str, Any]]:
    """One entry per configured context, sorted by context name."""
    places: dict[str, dict[str, set[str]]] = {}
    for env, context in rt.clusters.contexts.items():
        if env in rt.clusters.namespaces:
            p = places.setdefault(context, {"environments": set(), "namespaces": set()})
            p["environments"].add(env)
            p["namespaces"].add(rt.clusters.namespaces[env])
    if not places:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(places))) as pool:
        return list(pool.map(lambda c: _context(rt, c, sorted(places[c]["environments"]),
                                                sorted(places[c]["namespaces"])), sorted(places)))


def _context(rt: KubeRuntime, context: str, environments: list[str], namespaces: list[str]) -> dict[str, Any]:
    from codemind_dagster.resources.kube_runtime import KubeError

    entry: dict[str, Any] = {"context": context, "environments": environments, "namespaces": namespaces,
                             "server": None, "reachable": False, "error": None}
    try:
        api = rt._api(context)
        entry["server"] = api.host
        entry["nodes"] = [_node(n) for n in api.list("Node")]
        workloads: dict[str, list[dict[str, Any]]] = {"deployments": [], "rollouts": [], "replicasets": [],
                                                      "pods": []}
        for ns in namespaces:
            for part, items in _namespace(api, ns).items():
                workloads[part] += items
        entry.update(workloads)
        entry["reachable"] = True
    except KubeError as e:
        entry["error"] = str(e)
    return entry


def _namespace(api: _Api, ns: str) -> dict[str, list[dict[str, Any]]]:
    rsets = api.list("ReplicaSet", ns)
    rollouts = api.list("Rollout", ns, missing_ok=True)  # the Rollout CRD may not be installed
    return {
        "deployments": [_deployment(d) for d in api.list("Deployment", ns)],
        "rollouts": [_rollout(api, ro, rsets) for ro in rollouts],
        "replicasets": [_replicaset(rs) for rs in rsets],
        "pods": [_pod(p) for p in api.list("Pod", ns)],
    }


# ---- one object each -------------------------------------------------------------------------------


def _meta(obj: Mapping) -> dict[str, Any]:
    md = obj.get("metadata") or {}
    labels = md.get("labels") or {}
    return {"namespace": md.get("namespace"), "name": md.get("name"), "service": labels.get(SERVICE_LABEL),
            "environment": labels.get(ENV_LABEL),
            "managed": all(labels.get(k) == v for k, v in MANAGED_BY.items()),
            "artifact": (md.get("annotations") or {}).get(ARTIFACT_ANNOTATION)}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _node(n: Mapping) -> dict[str, Any]:
    st = n.get("status") or {}
    ready = next((c.get("status") == "True" for c in st.get("conditions") or [] if c.get("type") == "Ready"), False)
    addr = next((a.get("address") for a in st.get("addresses") or [] if a.get("type") == "InternalIP"), None)
    return {"name": n["metadata"]["name"], "ready": ready,
            "kubelet_version": (st.get("nodeInfo") or {}).get("kubeletVersion"), "internal_ip": addr,
            "unschedulable": bool((n.get("spec") or {}).get("unschedulable"))}


def _deployment(d: Mapping) -> dict[str, Any]:
    st = d.get("status") or {}
    conds = {c.get("type"): c.get("status") == "True" for c in st.get("conditions") or []}
    return {**_meta(d), "replicas": (d.get("spec") or {}).get("replicas"), "ready_replicas": st.get("readyReplicas", 0),
            "updated_replicas": st.get("updatedReplicas", 0), "available_replicas": st.get("availableReplicas", 0),
            "available": conds.get("Available", False),
            "revision": _int(((d.get("metadata") or {}).get("annotations") or {}).get(_DEPLOYMENT_REVISION))}


def _rollout(api: _Api, ro: Mapping, rsets: list[dict]) -> dict[str, Any]:
    st = ro.get("status") or {}
    name = ro["metadata"]["name"]
    revision = {(rs["metadata"].get("labels") or {}).get(m.ROLLOUT_HASH_LABEL):
                _int((rs["metadata"].get("annotations") or {}).get(_ROLLOUT_REVISION)) for rs in rsets
                if any(ref.get("uid") == ro["metadata"].get("uid") for ref in rs["metadata"].get("ownerReferences") or [])}
    return {**_meta(ro), "phase": st.get("phase"), "message": st.get("message"),
            "replicas": (ro.get("spec") or {}).get("replicas"), "ready_replicas": st.get("readyReplicas", 0),
            "stable_hash": st.get("stableRS"), "stable_revision": revision.get(st.get("stableRS")),
            "current_hash": st.get("currentPodHash"), "current_revision": revision.get(st.get("currentPodHash")),
            "step": st.get("currentStepIndex"), "aborted": bool(st.get("abort")),
            "canary_weight": _canary_weight(api, ro, name)}


def _canary_weight(api: _Api, ro: Mapping, name: str) -> int | None:
    """The canary Service's weight in the Rollout's Istio VirtualService, or None when there is none."""
    canary = ((ro.get("spec") or {}).get("strategy") or {}).get("canary") or {}
    vs_ref = ((canary.get("trafficRouting") or {}).get("istio") or {}).get("virtualService") or {}
    if not vs_ref.get("name") or not canary.get("canaryService"):
        return None
    vs = api.get("VirtualService", ro["metadata"]["namespace"], vs_ref["name"])
    routes = set(vs_ref.get("routes") or [])
    for route in ((vs or {}).get("spec") or {}).get("http") or []:
        if routes and route.get("name") not in routes:
            continue
        for dest in route.get("route") or []:
            if (dest.get("destination") or {}).get("host") == canary["canaryService"]:
                return dest.get("weight", 0)
    return None


def _owner(obj: Mapping) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    return f"{ref.get('kind')}/{ref.get('name')}" if ref else None


def _replicaset(rs: Mapping) -> dict[str, Any]:
    st = rs.get("status") or {}
    ann = (rs.get("metadata") or {}).get("annotations") or {}
    tpl_ann = ((((rs.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations") or {})
    return {**_meta(rs), "artifact": tpl_ann.get(ARTIFACT_ANNOTATION), "owner": _owner(rs),
            "revision": _int(ann.get(_DEPLOYMENT_REVISION) or ann.get(_ROLLOUT_REVISION)),
            "replicas": (rs.get("spec") or {}).get("replicas", 0), "ready_replicas": st.get("readyReplicas", 0)}


def _pod(p: Mapping) -> dict[str, Any]:
    st = p.get("status") or {}
    statuses = st.get("containerStatuses") or []
    ready = next((c.get("status") == "True" for c in st.get("conditions") or [] if c.get("type") == "Ready"), False)
    waiting = next((((c.get("state") or {}).get("waiting") or {}).get("reason") for c in statuses
                    if (c.get("state") or {}).get("waiting")), None)
    return {**_meta(p), "owner": _owner(p), "phase": st.get("phase"),
            "ready": ready and not p["metadata"].get("deletionTimestamp"),
            "terminating": bool(p["metadata"].get("deletionTimestamp")),
            "restarts": sum(c.get("restartCount", 0) for c in statuses), "waiting": waiting,
            "node": (p.get("spec") or {}).get("nodeName"), "pod_ip": st.get("podIP"), "started_at": st.get("startTime")}


# ---- rendering -------------------------------------------------------------------------------------


def summary_rows(clusters: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per context: context, reachable, nodes ready/total, workloads, pods ready/total, error."""
    rows = []
    for c in clusters:
        if not c["reachable"]:
            rows.append([c["context"], False, "-", "-", "-", "-", "-", c["error"]])
            continue
        nodes, pods = c["nodes"], c["pods"]
        rows.append([c["context"], True, f"{sum(n['ready'] for n in nodes)}/{len(nodes)}", len(c["deployments"]),
                     len(c["rollouts"]), len(c["replicasets"]), f"{sum(p['ready'] for p in pods)}/{len(pods)}", ""])
    return rows


SUMMARY_HEADERS = ["context", "reachable", "nodes ready", "deployments", "rollouts", "replicasets", "pods ready",
                   "error"]
