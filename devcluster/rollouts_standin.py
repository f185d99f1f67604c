"""Test infrastructure: a stand-in for the Argo Rollouts controller (canary with Istio weights), NOT Argo itself.

No Argo Rollouts controller runs on the local control planes (it is Go code we do not build and there is no
container runtime), so this program does its part for `argoproj.io/v1alpha1` Rollouts: a faithful subset of
Argo's canary strategy with Istio host-level traffic routing. It owns a ReplicaSet `<rollout>-<hash>` per pod
template, walks `setWeight`/`pause` steps, sets the stable/canary Services' `rollouts-pod-template-hash`
selectors and the VirtualService weights, and honours abort (`status.abort`), promote (clearing
`status.pauseConditions`) and undo (the template set back to the stable one). Not implemented: blueGreen,
analysis, experiments, setCanaryScale, DestinationRule subsets, scaleDownDelaySeconds, anti-affinity.

Run as `python -m devcluster.rollouts_standin --kubeconfig <admin kubeconfig>` (devcluster/cluster.py does).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("rollouts-standin")

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "rollouts"
ISTIO = ("networking.istio.io", "v1", "virtualservices")
HASH_LABEL = "rollouts-pod-template-hash"
REVISION = "rollout.argoproj.io/revision"
MANAGER = "rollouts-standin"
MERGE = "application/merge-patch+json"  # the client would pick json-patch for a dict body otherwise
RESYNC_S = 2.0
PAUSE_REASON = "CanaryPauseStep"


class SpecError(Exception):
    """The Rollout (or an object it names) cannot be served: reported as InvalidSpec, phase Degraded."""


# ---- pure parts: hash, steps, weights, the plan of one reconcile ------------------------------------------


def pod_template_hash(template: dict) -> str:
    """Like Argo's ComputeHash: fnv-32a of the template, spelled with Kubernetes' SafeEncodeString alphabet."""
    h = 0x811C9DC5
    for b in json.dumps(template, sort_keys=True, separators=(",", ":")).encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # no vowels: no words in names (k8s.io/apimachinery/pkg/util/rand)
    return "".join(alphabet[c % len(alphabet)] for c in str(h).encode())


def canary_replicas(replicas: int, weight: int) -> int:
    """Pods the canary needs for a weight: at least one as soon as it gets any traffic."""
    return 0 if weight <= 0 else max(1, math.ceil(replicas * weight / 100))


def weight_before(steps: list[dict], index: int) -> int:
    """The canary weight reached once steps[:index] are done: the last setWeight among them."""
    return next((int(s["setWeight"]) for s in reversed(steps[:index]) if "setWeight" in s), 0)


def parse_duration(value: Any) -> float | None:
    """Argo's pause duration: an int (seconds) or "10", "5s", "1m", "1h"; None means pause until promoted."""
    if value is None:
        return None
    m = re.fullmatch(r"(\d+)(s|m|h)?", str(value).strip())
    if not m:
        raise SpecError(f"invalid pause duration {value!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def set_vs_weights(vs_spec: dict, routes: list[str] | None, stable_svc: str, canary_svc: str,
                   weight: int) -> bool:
    """Sets canary/stable weights on the named http routes (all if none named); True if anything changed."""
    http = vs_spec.get("http") or []
    named = {r.get("name") for r in http}
    missing = [r for r in routes or [] if r not in named]
    if missing:
        raise SpecError(f"HTTP Route '{missing[0]}' is not found in the defined Virtual Service")
    changed = False
    for route in http:
        if routes and route.get("name") not in routes:
            continue
        for d in route.get("route") or []:
            host = (d.get("destination") or {}).get("host", "")
            for svc, w in ((stable_svc, 100 - weight), (canary_svc, weight)):
                if host == svc or host.startswith(svc + "."):  # short name or FQDN of the Service
                    changed |= d.get("weight") != w
                    d["weight"] = w
    return changed


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(status: dict, ctype: str, cstatus: str, reason: str, message: str, now: float) -> None:
    """Argo's SetRolloutCondition: kept as is when unchanged, lastTransitionTime kept while status holds."""
    conds = status.setdefault("conditions", [])
    old = next((c for c in conds if c["type"] == ctype), None)
    if old and (old["status"], old["reason"], old["message"]) == (cstatus, reason, message):
        return
    ts = rfc3339(now)
    new = {"type": ctype, "status": cstatus, "reason": reason, "message": message,
           "lastUpdateTime": ts, "lastTransitionTime": old["lastTransitionTime"] if old and
           old["status"] == cstatus else ts}
    status["conditions"] = [c for c in conds if c["type"] != ctype] + [new]


@dataclass
class Plan:
    """What one reconcile wants: replicas per template hash (others 0), selectors, canary weight, status."""

    status: dict
    replicas: dict[str, int] = field(default_factory=dict)
    stable_hash: str | None = None
    canary_hash: str | None = None
    weight: int = 0
    requeue_s: float = RESYNC_S


def check_spec(spec: dict) -> dict:
    """The canary strategy, or SpecError for what the stand-in does not implement."""
    strategy = spec.get("strategy") or {}
    canary = strategy.get("canary")
    if canary is None:
        other = ", ".join(sorted(strategy)) or "none"
        raise SpecError(f"the Argo Rollouts stand-in (devcluster/rollouts_standin.py) implements only "
                        f"spec.strategy.canary, not {other}")
    for i, step in enumerate(canary.get("steps") or []):
        if "setWeight" not in step and "pause" not in step:
            raise SpecError(f"step {i} ({', '.join(step)}) is not implemented by the Argo Rollouts stand-in")
        if "pause" in step:
            parse_duration((step["pause"] or {}).get("duration"))
    istio = (canary.get("trafficRouting") or {}).get("istio")
    if istio and not (canary.get("stableService") and canary.get("canaryService")):
        raise SpecError("Istio traffic routing needs spec.strategy.canary.stableService and canaryService")
    return canary


def invalid(ro: dict, why: str, now: float) -> dict:
    """The status of a Rollout the stand-in cannot serve."""
    st = copy.deepcopy(ro.get("status") or {})
    st.update(observedGeneration=str(ro["metadata"].get("generation", 0)), phase="Degraded",
              message=f"InvalidSpec: {why}")
    set_condition(st, "InvalidSpec", "True", "InvalidSpec", why, now)
    return st


def plan(ro: dict, rss: dict[str, dict], now: float) -> Plan:
    """One level-triggered step of Argo's canary, from the Rollout and its ReplicaSets (hash -> counts)."""
    spec, name = ro["spec"], ro["metadata"]["name"]
    canary = check_spec(spec)
    st = copy.deepcopy(ro.get("status") or {})
    st["conditions"] = [c for c in st.get("conditions") or [] if c["type"] != "InvalidSpec"]
    steps = canary.get("steps") or []
    n = int(spec.get("replicas", 1))
    h = pod_template_hash(spec["template"])
    if st.get("currentPodHash") != h:
        # A new template (an update or an undo) starts over at step 0 and clears an abort, as in Argo.
        st.update(currentPodHash=h, currentStepIndex=0)
        for k in ("abort", "abortedAt", "pauseConditions", "controllerPause"):
            st.pop(k, None)
    stable = st.get("stableRS") if st.get("stableRS") in rss else None
    idx = min(max(int(st.get("currentStepIndex") or 0), 0), len(steps))
    avail = {k: v.get("available", 0) for k, v in rss.items()}
    revision = rss.get(h, {}).get("revision") or max([r.get("revision", 0) for r in rss.values()] or [0]) + 1
    p = Plan(status=st, stable_hash=stable or h, canary_hash=h)
    phase, message = "Progressing", "more replicas need to be updated"

    def clear_pause() -> None:
        st.pop("pauseConditions", None)
        st.pop("controllerPause", None)

    if stable is None or stable == h:
        # First revision, a settled one, or an undo to the stable template: no canary, all on one RS.
        p.replicas, p.stable_hash = {h: n}, h
        st.pop("abort", None)
        clear_pause()
        idx = len(steps)  # Argo skips the steps when there is nothing to compare with
        if stable == h or avail.get(h, 0) >= n:
            st["stableRS"] = h
        if stable != h:
            message = "updated replicas are still becoming available"
    elif st.get("abort"):
        p.replicas, idx = {stable: n, h: 0}, 0
        clear_pause()
        st.setdefault("abortedAt", rfc3339(now))
        phase, message = "Degraded", f"RolloutAborted: Rollout aborted update to revision {revision}"
    elif spec.get("paused"):
        p.weight = weight_before(steps, idx)
        p.replicas = {stable: n, h: canary_replicas(n, p.weight)}
        phase, message = "Paused", "manually paused"
    elif idx >= len(steps):
        # Every step done: the new RS at full scale, then it becomes stable and takes all the traffic.
        p.weight = weight_before(steps, idx)
        p.replicas = {stable: n, h: n}
        if avail.get(h, 0) >= n:
            st["stableRS"] = p.stable_hash = h
            p.replicas, p.weight, p.requeue_s = {h: n}, 0, 0
        else:
            message = "updated replicas are still becoming available"
    else:
        step = steps[idx]
        p.weight = weight_before(steps, idx)
        if "setWeight" in step:
            want = canary_replicas(n, int(step["setWeight"]))
            p.replicas = {stable: n, h: want}
            if avail.get(h, 0) >= want:  # shift traffic only to canary pods that can take it
                p.weight, idx, p.requeue_s = int(step["setWeight"]), idx + 1, 0
            else:
                message = "updated replicas are still becoming available"
        else:
            p.replicas = {stable: n, h: canary_replicas(n, p.weight)}
            duration = parse_duration((step["pause"] or {}).get("duration"))
            pauses = [c for c in st.get("pauseConditions") or [] if c.get("reason") == PAUSE_REASON]
            if pauses:
                started = datetime.fromisoformat(pauses[0]["startTime"]).timestamp()
                if duration is not None and now >= started + duration:
                    clear_pause()
                    idx, p.requeue_s = idx + 1, 0
                else:
                    phase, message = "Paused", PAUSE_REASON
                    if duration is not None:
                        p.requeue_s = min(RESYNC_S, max(0.05, started + duration - now))
            elif st.get("controllerPause"):
                # We paused and someone cleared pauseConditions: Argo's promote, the step is done.
                clear_pause()
                idx, p.requeue_s = idx + 1, 0
            else:
                st["pauseConditions"] = [{"reason": PAUSE_REASON, "startTime": rfc3339(now)}]
                st["controllerPause"] = True
                phase, message, p.requeue_s = "Paused", PAUSE_REASON, min(RESYNC_S, duration or RESYNC_S)

    current = st.get("stableRS")
    others_gone = all(v.get("replicas", 0) == 0 for k, v in rss.items() if k != h)
    if current == h and phase == "Progressing" and avail.get(h, 0) >= n:
        if others_gone:
            phase, message = "Healthy", ""
        else:
            message, p.requeue_s = "old replicas are pending termination", min(p.requeue_s, 0.5)
    st.update(observedGeneration=str(ro["metadata"].get("generation", 0)), currentStepIndex=idx, phase=phase,
              message=message, replicas=sum(v.get("replicas", 0) for v in rss.values()),
              updatedReplicas=rss.get(h, {}).get("replicas", 0),
              readyReplicas=sum(v.get("ready", 0) for v in rss.values()),
              availableReplicas=sum(avail.values()))
    st["HPAReplicas"] = st["availableReplicas"]
    labels = ((spec.get("selector") or {}).get("matchLabels") or {})
    st["selector"] = ",".join(f"{k}={v}" for k, v in sorted({**labels, HASH_LABEL: h}.items()))
    if not message:
        st.pop("message")
    if not steps:
        st.pop("currentStepIndex")
    if (canary.get("trafficRouting") or {}).get("istio"):
        st.setdefault("canary", {})["weights"] = {
            "canary": {"weight": p.weight, "podTemplateHash": p.canary_hash, "serviceName": canary["canaryService"]},
            "stable": {"weight": 100 - p.weight, "podTemplateHash": p.stable_hash,
                       "serviceName": canary["stableService"]}}
    ok = st["availableReplicas"] >= n
    set_condition(st, "Available", "True" if ok else "False", "AvailableReason",
                  f"Rollout {'has' if ok else 'does not have'} minimum availability", now)
    progressing = {
        "Healthy": ("True", "NewReplicaSetAvailable", f'Rollout "{name}" has successfully progressed.'),
        "Paused": ("Unknown", "RolloutPaused", "Rollout is paused"),
        "Degraded": ("False", "RolloutAborted", message.removeprefix("RolloutAborted: ")),
    }.get(phase, ("True", "ReplicaSetUpdated", f'ReplicaSet "{name}-{h}" is progressing.'))
    set_condition(st, "Progressing", *progressing, now)
    return p


# ---- the controller: reads the cluster, applies a plan ------------------------------------------------------


class Controller:
    """Reconciles every Rollout of one cluster, level-triggered; woken by watches, resynced every RESYNC_S."""

    def __init__(self, api_client):
        from kubernetes import client

        self.client = client
        self.co, self.apps, self.core = (client.CustomObjectsApi(api_client), client.AppsV1Api(api_client),
                                         client.CoreV1Api(api_client))
        self.wake = threading.Event()

    def run(self) -> None:
        watches = {"rollouts": (self.co.list_cluster_custom_object, (GROUP, VERSION, PLURAL), {}),
                   "replicasets": (self.apps.list_replica_set_for_all_namespaces, (), {"label_selector": HASH_LABEL})}
        for name, what in watches.items():
            threading.Thread(target=self._watch, args=(name, *what), name=f"watch-{name}", daemon=True).start()
        failing = False
        while True:
            self.wake.clear()
            wait = RESYNC_S
            try:
                items = self.co.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=15)["items"]
                if failing:
                    log.info("listing Rollouts works again")
                failing = False
            except Exception as e:  # noqa: BLE001 - CRD not installed yet, apiserver restarting: retry quietly
                if not failing:
                    log.warning("cannot list Rollouts yet (%s); retrying", _short(e))
                failing, items, wait = True, [], 1.0
            for ro in items:
                try:
                    wait = min(wait, self.reconcile(ro))
                except self.client.ApiException as e:
                    if e.status != 409:  # 409: someone wrote meanwhile; look again at once
                        log.warning("%s: %s", _key(ro), _short(e))
                    wait = 0 if e.status == 409 else min(wait, 1.0)
                except Exception:
                    log.exception("%s: reconcile failed", _key(ro))
                    wait = min(wait, 1.0)
            self.wake.wait(max(wait, 0.05))  # a short floor batches the events of our own writes

    def _watch(self, name: str, fn, args: tuple, kw: dict) -> None:
        from kubernetes import watch

        while True:
            try:
                for _ in watch.Watch().stream(fn, *args, timeout_seconds=60, _request_timeout=75, **kw):
                    self.wake.set()
            except Exception as e:  # noqa: BLE001 - a broken watch: the resync covers the gap, then watch again
                log.debug("watch %s: %s", name, _short(e))
                time.sleep(1.0)

    def reconcile(self, ro: dict) -> float:
        """Brings one Rollout one step closer to its plan; returns when to look again (seconds)."""
        ns, name, uid = ro["metadata"]["namespace"], ro["metadata"]["name"], ro["metadata"]["uid"]
        if ro["metadata"].get("deletionTimestamp"):
            return RESYNC_S
        now = time.time()
        rs_list = json.loads(self.apps.list_namespaced_replica_set(
            ns, label_selector=HASH_LABEL, _preload_content=False, _request_timeout=15).data)["items"]
        owned = {r["metadata"]["labels"][HASH_LABEL]: r for r in rs_list
                 if any(o.get("uid") == uid and o.get("controller") for o in r["metadata"].get("ownerReferences") or [])}
        try:
            p = plan(ro, {k: _counts(r) for k, r in owned.items()}, now)
            self._apply(ro, owned, p)
        except SpecError as e:
            self._write_status(ro, invalid(ro, str(e), now))
            return RESYNC_S
        self._write_status(ro, p.status)
        rev = _revision(owned.get(p.canary_hash)) if p.canary_hash in owned else 0
        if rev and (ro["metadata"].get("annotations") or {}).get(REVISION) != str(rev):
            self.co.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                   {"metadata": {"annotations": {REVISION: str(rev)}}},
                                                   field_manager=MANAGER, _content_type=MERGE, _request_timeout=15)
        return p.requeue_s

    def _apply(self, ro: dict, owned: dict[str, dict], p: Plan) -> None:
        """Scale up, point the Services, move the weights, then scale down: never less capacity than traffic."""
        ns, spec = ro["metadata"]["namespace"], ro["spec"]
        canary = spec["strategy"]["canary"]
        top = max([_revision(r) for r in owned.values()] or [0])
        h = pod_template_hash(spec["template"])
        if h not in owned and p.replicas.get(h):
            owned[h] = self._create_rs(ro, h, p.replicas[h], top + 1)
        elif h in owned and _revision(owned[h]) < top:
            # An undo makes an old ReplicaSet current again: like Argo, it gets the newest revision.
            self._patch_rs(owned[h], {"metadata": {"annotations": {REVISION: str(top + 1)}}})
        for k, r in owned.items():
            if p.replicas.get(k, 0) > (r["spec"].get("replicas") or 0):
                self._scale(r, p.replicas[k])
        for svc, want in ((canary.get("stableService"), p.stable_hash), (canary.get("canaryService"),
                                                                        p.canary_hash)):
            if svc and want:
                self._select(ns, svc, want)
        istio = (canary.get("trafficRouting") or {}).get("istio") or {}
        for vs in ([istio["virtualService"]] if istio.get("virtualService") else []) + \
                (istio.get("virtualServices") or []):
            self._weigh(ns, vs, canary["stableService"], canary["canaryService"], p.weight)
        for k, r in owned.items():
            if p.replicas.get(k, 0) < (r["spec"].get("replicas") or 0):
                self._scale(r, p.replicas.get(k, 0))

    def _create_rs(self, ro: dict, h: str, replicas: int, revision: int) -> dict:
        meta, spec = ro["metadata"], ro["spec"]
        tpl = copy.deepcopy(spec["template"])
        tpl.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        body = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{h}", "namespace": meta["namespace"],
                         "labels": dict(tpl["metadata"]["labels"]), "annotations": {REVISION: str(revision)},
                         "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Rollout",
                                              "name": meta["name"], "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"replicas": replicas, "minReadySeconds": spec.get("minReadySeconds") or 0,
                     "selector": selector, "template": tpl},
        }
        log.info("%s: created ReplicaSet %s (revision %d, %d replicas)", _key(ro), body["metadata"]["name"],
                 revision, replicas)
        resp = self.apps.create_namespaced_replica_set(meta["namespace"], body, field_manager=MANAGER,
                                                       _preload_content=False, _request_timeout=15)
        return json.loads(resp.data)

    def _patch_rs(self, rs: dict, body: dict) -> None:
        self.apps.patch_namespaced_replica_set(rs["metadata"]["name"], rs["metadata"]["namespace"], body,
                                               field_manager=MANAGER, _content_type=MERGE, _request_timeout=15)

    def _scale(self, rs: dict, replicas: int) -> None:
        log.info("%s/%s: scaling to %d", rs["metadata"]["namespace"], rs["metadata"]["name"], replicas)
        self._patch_rs(rs, {"spec": {"replicas": replicas}})
        rs["spec"]["replicas"] = replicas

    def _select(self, ns: str, svc: str, h: str) -> None:
        try:
            have = self.core.read_namespaced_service(svc, ns, _request_timeout=15)
        except self.client.ApiException as e:
            if e.status == 404:
                raise SpecError(f'service "{svc}" not found') from e
            raise
        if (have.spec.selector or {}).get(HASH_LABEL) != h:
            log.info("%s/%s: selector %s=%s", ns, svc, HASH_LABEL, h)
            self.core.patch_namespaced_service(svc, ns, {"spec": {"selector": {HASH_LABEL: h}}}, field_manager=MANAGER,
                                               _content_type=MERGE, _request_timeout=15)

    def _weigh(self, ns: str, ref: dict, stable_svc: str, canary_svc: str, weight: int) -> None:
        try:
            vs = self.co.get_namespaced_custom_object(*ISTIO[:2], ns, ISTIO[2], ref["name"], _request_timeout=15)
        except self.client.ApiException as e:
            if e.status == 404:
                raise SpecError(f'VirtualService "{ref["name"]}" not found') from e
            raise
        if set_vs_weights(vs.setdefault("spec", {}), ref.get("routes"), stable_svc, canary_svc, weight):
            log.info("%s/%s: weights stable %d / canary %d", ns, ref["name"], 100 - weight, weight)
            # A PUT with the resourceVersion we read: a concurrent change makes it fail (409), never lost.
            self.co.replace_namespaced_custom_object(*ISTIO[:2], ns, ISTIO[2], ref["name"], vs,
                                                     field_manager=MANAGER, _request_timeout=15)

    def _write_status(self, ro: dict, status: dict) -> None:
        if status == (ro.get("status") or {}):
            return
        old = ro.get("status") or {}
        if (old.get("phase"), old.get("message"), old.get("currentStepIndex")) != \
                (status.get("phase"), status.get("message"), status.get("currentStepIndex")):
            log.info("%s: phase %s, step %s, %s", _key(ro), status.get("phase"), status.get("currentStepIndex"),
                     status.get("message") or "-")
        # A PUT of the status subresource with the resourceVersion read: the product's abort/promote patches
        # landing meanwhile make it fail with 409 instead of being overwritten.
        self.co.replace_namespaced_custom_object_status(GROUP, VERSION, ro["metadata"]["namespace"], PLURAL,
                                                        ro["metadata"]["name"], {**ro, "status": status},
                                                        field_manager=MANAGER, _request_timeout=15)


def _counts(rs: dict) -> dict:
    st = rs.get("status") or {}
    return {"replicas": st.get("replicas", 0), "ready": st.get("readyReplicas", 0),
            "available": st.get("availableReplicas", 0), "revision": _revision(rs)}


def _revision(rs: dict | None) -> int:
    try:
        return int(((rs or {}).get("metadata", {}).get("annotations") or {}).get(REVISION, 0))
    except ValueError:
        return 0


def _key(ro: dict) -> str:
    return f"{ro['metadata']['namespace']}/{ro['metadata']['name']}"


def _short(e: Exception) -> str:
    if hasattr(e, "status") and hasattr(e, "reason"):
        try:  # the apiserver's own words, e.g. "namespace ... is being terminated"
            return f"{e.status} {e.reason}: {json.loads(e.body)['message'][:200]}"
        except (TypeError, ValueError, KeyError):
            return f"{e.status} {e.reason}"
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _interrupt(signum, frame) -> None:
    # SIGTERM ends the process like Ctrl-C, even inside a blocking API call: all the work is level-triggered.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve every Rollout of the cluster of --kubeconfig until SIGTERM or Ctrl-C."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--context")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s rollouts-standin %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from kubernetes import config

        log.info("stand-in for the Argo Rollouts controller (test infrastructure, not Argo): canary steps "
                 "with Istio weights for %s/%s %s", GROUP, VERSION, PLURAL)
        Controller(config.new_client_from_config(args.kubeconfig, context=args.context)).run()
    except KeyboardInterrupt:
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
