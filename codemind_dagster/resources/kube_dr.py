"""DR drill of the k8s profile: the verified restore, then every production release redeployed into the dr cluster.

After LocalBackupStore's restore and verification, the drill (1) creates a Velero Backup of the production
namespace in the production context and a Restore of it in the dr context, (2) redeploys every release the
restored database records as live in production into the `dr` environment with KubeRuntime, from the restored
bundle (content hash verified), and probes each over the HTTP contract, (3) tears the dr releases down unless
told to keep them. RTO covers restore, redeploys and probes. No Velero controller runs in the test clusters: the
Velero checks then say plainly that no controller answered and do not fail the drill.

The kubernetes package is imported inside functions only (through kube_runtime): this module loads with the
definitions.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from codemind_dagster.domain.dr import (
    ARTIFACTS_DIR,
    VELERO_API,
    BackupManifest,
    DrillCheck,
    DrRelease,
    contract_paths,
    velero_backup,
    velero_name,
    velero_restore,
    velero_verdict,
)
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.artifacts import LocalArtifactStore
from codemind_dagster.resources.backups import BackupStoreResource, LocalBackupStore, _sqlite_readonly
from codemind_dagster.resources.clusters import MANAGED_BY, ClusterMap
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.runtime import DeployError, _probe

SOURCE_ENV = "production"
DR_ENV = "dr"
VELERO_NAMESPACE = "velero"
_PARALLEL = 4


class KubeBackupStore(LocalBackupStore):
    """LocalBackupStore whose drill also recovers production into the dr cluster (Velero objects, redeploys)."""

    def __init__(self, root: Path, db: PlatformDB, artifacts_root: Path, retention: int = 8, *,
                 clusters: ClusterMap, runtime: Any, scratch_root: Path | None = None,
                 keep_dr_releases: bool = False, velero_namespace: str = VELERO_NAMESPACE,
                 velero_wait_s: float = 3.0, probe_timeout_s: float = 5.0):
        super().__init__(root, db, artifacts_root, retention, scratch_root=scratch_root)
        self.clusters = clusters
        self.runtime = runtime  # a KubeRuntime over the same clusters
        self.keep_dr_releases = keep_dr_releases
        self.velero_namespace = velero_namespace
        self.velero_wait_s = velero_wait_s
        self.probe_timeout_s = probe_timeout_s
        # What the last drill saw in the dr cluster, per service: the probes' answers (for the UI and tests).
        self.last_probes: dict[str, list[dict[str, Any]]] = {}

    # -- the hook LocalBackupStore.drill calls after restore and verification -----------------------
    def recover(self, backup_id: str, restored: Path, manifest: BackupManifest | None,
                checks: list[DrillCheck], stop_clock: Callable[[], None]) -> list[DrillCheck]:
        """Velero objects, redeploy and probe of every live production release in dr, then teardown."""
        out: list[DrillCheck] = []
        velero = self._create_velero(backup_id)
        created = time.monotonic()
        deployed: list[str] = []
        try:
            releases, why = self._releases(restored, manifest)
            if releases is None:
                out.append(DrillCheck(name="dr_releases", ok=False, detail=f"not run: {why}"))
            else:
                names = ", ".join(f"{r.service} {r.artifact[:12]}" for r in releases) or "none"
                out.append(DrillCheck(name="dr_releases", ok=True, detail=(
                    f"{len(releases)} live {SOURCE_ENV} release(s) in the restored backup: {names}" if releases
                    else f"the restored backup records no live {SOURCE_ENV} release; nothing to redeploy")))
                out += self._redeploy_all(restored, releases, deployed)
            stop_clock()  # RTO: restore, redeploys and probes; teardown and Velero bookkeeping are not recovery
        finally:
            out.append(self._teardown(deployed))
        # The redeploys gave a controller time to answer; wait out the rest of the short grace if they did not.
        time.sleep(max(0.0, self.velero_wait_s - (time.monotonic() - created)))
        out += self._velero_checks(velero, created)
        return out

    # -- the releases the backup says production ran ----------------------------------------------
    def _releases(self, restored: Path, manifest: BackupManifest | None) -> tuple[list[DrRelease] | None, str]:
        if manifest is None:
            return None, "the backup could not be restored"
        db_path = restored / manifest.db_file
        if not db_path.is_file():
            return None, f"{manifest.db_file} is missing from the restore"
        engine = _sqlite_readonly(db_path)
        try:
            with engine.connect() as c:
                rows = c.execute(sa.select(t.deployments.c.intent, t.deployments.c.artifact)
                                 .where(t.deployments.c.environment == SOURCE_ENV, t.deployments.c.status == "live")
                                 .order_by(t.deployments.c.intent, t.deployments.c.id)).all()
                specs = dict(c.execute(sa.select(t.intents.c.name, t.intents.c.spec)).all())
        except (sa.exc.DBAPIError, sqlite3.Error) as e:
            return None, f"restored database unreadable: {type(e).__name__}: {e}"[:500]
        finally:
            engine.dispose()
        # One live row per intent is the rule (finish_deployment supersedes); the newest wins if not.
        latest = {r.intent: r.artifact for r in rows}
        return [DrRelease(service=name, artifact=art, spec=specs.get(name)) for name, art in sorted(latest.items())], ""

    def _bundle(self, restored: Path, artifact: str) -> tuple[Path | None, str]:
        """The release's bundle, restored copy first, then the artifact store; only one whose content hash holds."""
        problems = []
        for where, root in (("restored artifact data", restored / ARTIFACTS_DIR),
                            ("artifact store", self.artifacts_root)):
            store = LocalArtifactStore(root)
            if not store.has(artifact):
                problems.append(f"not in the {where}")
                continue
            try:
                store.read_bundle(artifact)  # raises when the files no longer hash to the artifact id
            except (ValueError, OSError, KeyError) as e:
                problems.append(f"{where}: {e}")
                continue
            return store.bundle_dir(artifact), f"bundle from the {where} (content hash verified)"
        return None, "; ".join(problems)

    # -- redeploy and probe -------------------------------------------------------------------------
    def _redeploy_all(self, restored: Path, releases: list[DrRelease], deployed: list[str]) -> list[DrillCheck]:
        if not releases:
            return []
        self.last_probes = {}
        with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(releases))) as pool:
            results = list(pool.map(lambda r: self._redeploy(restored, r, deployed), releases))
        return [c for pair in results for c in pair]

    def _redeploy(self, restored: Path, r: DrRelease, deployed: list[str]) -> list[DrillCheck]:
        target = self.clusters.target(DR_ENV)
        where = f"namespace {target.namespace} of context {target.context!r}"
        name = f"{r.service} {r.artifact[:12]}"
        deploy_check, probe_check = f"dr_deploy:{r.service}", f"dr_contract:{r.service}"
        bundle, source = self._bundle(restored, r.artifact)
        if bundle is None:
            return [DrillCheck(name=deploy_check, ok=False, detail=f"{name}: no intact bundle ({source})"),
                    DrillCheck(name=probe_check, ok=False, detail=f"not run: {r.service} was not redeployed")]
        deployed.append(r.service)  # before deploying: a deploy that dies midway still gets torn down
        t0 = time.monotonic()
        try:
            outcome = self.runtime.deploy(service=r.service, environment=DR_ENV, artifact=r.artifact,
                                          bundle_dir=bundle)
        except Exception as e:  # noqa: BLE001 - any error is this release's failed recovery, recorded as such
            return [DrillCheck(name=deploy_check, ok=False,
                               detail=f"{name} could not be deployed to {where}: {type(e).__name__}: {e}"[:2000]),
                    DrillCheck(name=probe_check, ok=False, detail=f"not run: {r.service} was not redeployed")]
        if not outcome.ok:
            return [DrillCheck(name=deploy_check, ok=False,
                               detail=_clip(f"{name} did not come up in {where} ({outcome.outcome}): {outcome.reason}")),
                    DrillCheck(name=probe_check, ok=False, detail=f"not run: {r.service} was not redeployed")]
        ok_deploy = DrillCheck(name=deploy_check, ok=True, detail=(
            f"{name} {outcome.outcome} in {where} in {time.monotonic() - t0:.1f}s from the {source}; "
            f"serving at {outcome.url}"))
        return [ok_deploy, self._probe(r, outcome.url, probe_check)]

    def _probe(self, r: DrRelease, url: str, check: str) -> DrillCheck:
        """GET /healthz must answer 200 {"status": "ok"}; every list route of the intent must answer 200 with a list."""
        parts = urlsplit(url)
        answers: list[dict[str, Any]] = []
        ok, detail = _probe(parts.hostname or "", parts.port or 80, self.probe_timeout_s)
        answers.append({"path": "/healthz", "ok": ok, "detail": detail})
        problems = [] if ok else [f"GET {url}/healthz: {detail}"]
        try:
            paths = contract_paths(r.spec)
            note = "" if r.spec else " (no intent recorded: /healthz only)"
        except ValueError as e:
            paths, note = [], f" (recorded intent unreadable, /healthz only: {str(e).splitlines()[0][:200]})"
        for path in paths:
            ok, detail = _get_list(url + path, self.probe_timeout_s)
            answers.append({"path": path, "ok": ok, "detail": detail})
            if not ok:
                problems.append(f"GET {url}{path}: {detail}")
        self.last_probes[r.service] = answers
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return DrillCheck(name=check, ok=False, detail=f"{r.service} in {DR_ENV}: {problems[0]}{more}")
        said = ", ".join(f"GET {a['path']} {a['detail']}" for a in answers)
        return DrillCheck(name=check, ok=True, detail=f"{r.service} at {url} answered the contract: {said}{note}")

    def _teardown(self, deployed: list[str]) -> DrillCheck:
        target = self.clusters.target(DR_ENV)
        where = f"namespace {target.namespace} of context {target.context!r}"
        services = sorted(set(deployed))
        if self.keep_dr_releases:
            return DrillCheck(name="dr_teardown", ok=True, detail=(
                f"kept {len(services)} release(s) running in {where} (keep_dr_releases): {', '.join(services)}"
                if services else f"nothing was deployed to {where}"))
        problems = []
        for service in services:
            try:
                self.runtime.stop(service, DR_ENV)
                if self.runtime.status(service, DR_ENV) is not None:
                    problems.append(f"{service} still runs in {where} after stop")
            except DeployError as e:
                problems.append(f"{service}: {e}")
        if problems:
            return DrillCheck(name="dr_teardown", ok=False, detail="; ".join(problems)[:2000])
        return DrillCheck(name="dr_teardown", ok=True, detail=(
            f"removed {len(services)} release(s) from {where}: {', '.join(services)}" if services
            else f"nothing was deployed to {where}"))

    # -- Velero --------------------------------------------------------------------------------------
    def _create_velero(self, backup_id: str) -> list[tuple[str, str, str, DrillCheck | None]]:
        """Backup in the production context, then Restore in the dr one: [(kind, context, name, failure)]."""
        src, dst = self.clusters.target(SOURCE_ENV), self.clusters.target(DR_ENV)
        name = velero_name(backup_id, uuid.uuid4().hex[:6])
        labels = {**MANAGED_BY, "codemind.dev/drill": "dr"}
        objs = [(src.context, velero_backup(name, self.velero_namespace, src.namespace, labels, backup_id)),
                (dst.context, velero_restore(name, self.velero_namespace, name, src.namespace, dst.namespace,
                                             labels, backup_id))]
        made = []
        for context, obj in objs:
            kind = obj["kind"]
            try:
                api = self.runtime._api(context)  # the runtime's client: its errors name the context
                self._ensure_namespace(api)
                api.request("POST", _velero_path(self.velero_namespace, kind), body=obj,
                            query={"fieldManager": "codemind", "fieldValidation": "Strict"})
                made.append((kind, context, name, None))
            except DeployError as e:
                made.append((kind, context, name, DrillCheck(
                    name=f"velero_{kind.lower()}", ok=False,
                    detail=f"could not create {VELERO_API} {kind} {self.velero_namespace}/{name}: {e}"[:2000])))
        return made

    def _ensure_namespace(self, api: Any) -> None:
        # deploy/k8s/00-namespaces.yaml makes it in a real install; clusters brought up bare lack it.
        if api.request("GET", f"/api/v1/namespaces/{self.velero_namespace}", missing_ok=True) is None:
            api.request("POST", "/api/v1/namespaces", body={
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": self.velero_namespace, "labels": {"app.kubernetes.io/part-of": "codemind"}}})

    def _velero_checks(self, made: list[tuple[str, str, str, DrillCheck | None]], created: float) -> list[DrillCheck]:
        out = []
        for kind, context, name, failure in made:
            if failure is not None:
                out.append(failure)
                continue
            where = f"{self.velero_namespace}/{name} ({VELERO_API}) in context {context!r}"
            try:
                obj = self.runtime._api(context).request(
                    "GET", _velero_path(self.velero_namespace, kind, name), missing_ok=True)
            except DeployError as e:
                out.append(DrillCheck(name=f"velero_{kind.lower()}", ok=False, detail=f"{kind} {where}: {e}"[:2000]))
                continue
            if obj is None:
                out.append(DrillCheck(name=f"velero_{kind.lower()}", ok=False,
                                      detail=f"{kind} {where} disappeared after it was created"))
                continue
            phase = (obj.get("status") or {}).get("phase")
            ok, detail = velero_verdict(kind, where, phase, time.monotonic() - created)
            out.append(DrillCheck(name=f"velero_{kind.lower()}", ok=ok, detail=detail))
        return out


def _clip(text: str, limit: int = 3000) -> str:
    """Head and tail of a long reason: the tail holds the pod's last log lines, where the error is."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return f"{text[:head]} … {text[-(limit - head):]}"


def _velero_path(namespace: str, kind: str, name: str | None = None) -> str:
    p = f"/apis/{VELERO_API}/namespaces/{namespace}/{kind.lower()}s"
    return f"{p}/{name}" if name else p


def _get_list(url: str, timeout: float) -> tuple[bool, str]:
    """GET url: (True, "200, n items") for a JSON list (or a page object with `items`), else what happened."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                    timeout=timeout) as resp:
            status, body = resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code} {e.read(200).decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return False, f"{type(e).__name__}: {e}"
    try:
        data = json.loads(body)
    except ValueError:
        return False, f"HTTP {status}, not JSON: {body[:200].decode(errors='replace')}"
    items = data.get("items") if isinstance(data, dict) else data
    if status != 200 or not isinstance(items, list):
        return False, f"HTTP {status}, expected a list, got {body[:200].decode(errors='replace')}"
    return True, f"{status}, {len(items)} item(s)"


class KubeBackupStoreResource(BackupStoreResource):  # a BackupStoreResource, so dr assets typed with it take it
    """Backups and drills of the k8s profile: the local restore drill plus recovery into the dr cluster."""

    kubeconfig_path: str
    k8s_contexts: str | None = None
    k8s_namespaces: str | None = None
    health_timeout_s: float = 120.0
    # Leave the dr releases running after the drill (e.g. to look at them); by default the drill removes them.
    keep_dr_releases: bool = False
    velero_namespace: str = VELERO_NAMESPACE
    velero_wait_s: float = 3.0

    def store(self) -> KubeBackupStore:  # type: ignore[override]
        from codemind_dagster.resources.kube_runtime import KubeRuntime

        clusters = ClusterMap.parse(Path(self.kubeconfig_path), self.k8s_contexts, self.k8s_namespaces)
        # dr is never a canary environment: a recovery brings every release up at once as a Deployment.
        runtime = KubeRuntime(clusters, health_timeout_s=self.health_timeout_s, canary_environments=(SOURCE_ENV,))
        return KubeBackupStore(
            Path(self.root), self.database.client(), Path(self.artifacts_root), self.retention,
            clusters=clusters, runtime=runtime, scratch_root=Path(self.scratch_root) if self.scratch_root else None,
            keep_dr_releases=self.keep_dr_releases, velero_namespace=self.velero_namespace,
            velero_wait_s=self.velero_wait_s)
