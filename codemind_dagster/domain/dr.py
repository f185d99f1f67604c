"""Backups and disaster-recovery drills: manifests, checks, results and the pure rules that verify them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"
DB_FILE = "platform.db"
ARTIFACTS_DIR = "artifacts"
CHECK_NAMES = ("backup_readable", "db_checksum", "schema_version", "row_counts", "record_sample",
               "artifact_checksums")


class FileDigest(BaseModel):
    sha256: str
    size: int


class RecordSample(BaseModel):
    """One row, found again by its primary key; the digest covers every column."""

    key: dict[str, Any]
    digest: str


class BackupManifest(BaseModel):
    """What a backup holds and how to prove a restore of it is whole."""

    format: Literal[1] = 1
    id: str
    created_at: datetime
    # The point in time of the database snapshot; RPO is measured from here.
    data_as_of: datetime
    source: str  # dialect of the platform DB that was captured: sqlite | postgresql
    schema_revision: str | None
    db_file: str = DB_FILE
    db: FileDigest
    row_counts: dict[str, int]
    samples: dict[str, list[RecordSample]] = Field(default_factory=dict)
    # Paths relative to the artifact store root, e.g. bundles/<sha256>/service/app.py.
    artifacts: dict[str, FileDigest] = Field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())

    @property
    def size_bytes(self) -> int:
        return self.db.size + sum(f.size for f in self.artifacts.values())


class BackupRecord(BaseModel):
    """A row of the backups table: ok, failed, or expired (removed by retention)."""

    id: str
    created_at: datetime
    data_as_of: datetime
    location: str
    size_bytes: int
    status: str
    detail: str | None = None


class DrillCheck(BaseModel):
    name: str
    ok: bool
    detail: str


class DrillResult(BaseModel):
    backup: str
    ok: bool
    rpo_s: float
    rto_s: float
    checks: list[DrillCheck]
    started_at: datetime
    finished_at: datetime
    data_as_of: datetime | None = None
    id: int | None = None  # the dr_drills row, once recorded

    @property
    def failure(self) -> str | None:
        """The first failed check as `name: detail`; the reason a drill failed."""
        bad = next((c for c in self.checks if not c.ok), None)
        return f"{bad.name}: {bad.detail}" if bad else None

    def document(self) -> dict[str, Any]:
        """The stable JSON shape of `codemind dr validate --json`."""
        return {"backup": self.backup, "ok": self.ok, "rpo_s": round(self.rpo_s, 3), "rto_s": round(self.rto_s, 3),
                "checks": [c.model_dump() for c in self.checks]}


class UnknownBackup(LookupError):
    """The requested backup does not exist (or can no longer be restored)."""


class BackupStore(Protocol):
    """The interface a backup backend fills: local files, plus recovery into the dr cluster in k8s."""

    def create(self) -> BackupManifest: ...

    def drill(self, backup_id: str | None, scratch_root: Path) -> DrillResult: ...

    def latest(self) -> BackupRecord | None: ...

    def list(self) -> list[BackupRecord]: ...


# -- canonical records ----------------------------------------------------------------------------

def canonical_value(value: Any) -> Any:
    """A JSON value that is equal for the same datum read from PostgreSQL or from SQLite."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal):
        # SQLite hands Numeric back padded to the column scale, PostgreSQL as stored: compare the number.
        return format(value.normalize(), "f")
    if isinstance(value, datetime):
        # SQLite drops the zone of timezone-aware columns; every stored time is UTC.
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical_value(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def record_digest(row: Mapping[str, Any]) -> str:
    body = json.dumps({k: canonical_value(v) for k, v in row.items()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def sample_offsets(count: int, size: int = 3) -> list[int]:
    """First, middle and last rows: cheap, deterministic, and they cover old and fresh data."""
    if count <= 0:
        return []
    picks = [0, count // 2, count - 1] if size >= 3 else [0, count - 1][:size]
    return sorted(set(picks))


# -- verification rules ---------------------------------------------------------------------------

def check_size(name: str, actual: int | None, expected: int) -> str | None:
    """None when the file is whole, else the reason."""
    if actual is None:
        return f"{name} is missing"
    if actual != expected:
        return f"{name} is {actual} bytes, manifest says {expected}"
    return None


def compare_digests(expected: Mapping[str, FileDigest], actual_sha256: Mapping[str, str | None]) -> list[str]:
    """One reason per file whose content differs from the manifest, in path order."""
    problems = []
    for path in sorted(expected):
        got = actual_sha256.get(path)
        if got is None:
            problems.append(f"{path} is missing")
        elif got != expected[path].sha256:
            problems.append(f"{path}: sha256 {got[:12]}…, manifest says {expected[path].sha256[:12]}…")
    return problems


def compare_row_counts(expected: Mapping[str, int], actual: Mapping[str, int | None]) -> list[str]:
    problems = []
    for table in sorted(expected):
        got = actual.get(table)
        if got is None:
            problems.append(f"{table}: table missing after restore")
        elif got != expected[table]:
            problems.append(f"{table}: {got} rows restored, manifest says {expected[table]}")
    return problems


def summarize(problems: list[str], ok_detail: str) -> tuple[bool, str]:
    """(ok, detail): the first problem named, with how many more there are."""
    if not problems:
        return True, ok_detail
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return False, problems[0] + more


def history_markdown(rows: list[Mapping[str, Any]]) -> str:
    """The drill history as a markdown table for the asset's metadata."""
    lines = ["| drill | backup | started (UTC) | ok | RPO s | RTO s | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        started = r["started_at"]
        when = canonical_value(started)[:19].replace("T", " ") if started else "-"
        detail = (r.get("detail") or "").replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {r['id']} | {r['backup_id']} | {when} | {'✅' if r['ok'] else '❌'} | "
                     f"{r['rpo_s']:.1f} | {r['rto_s']:.3f} | {detail} |")
    return "\n".join(lines)


# -- DR into a second cluster (k8s profile) --------------------------------------------------------

VELERO_API = "velero.io/v1"
# Velero phases after which nothing more happens; the failed ones mean the cluster state was not captured.
VELERO_DONE = frozenset({"Completed"})
VELERO_FAILED = frozenset({"Failed", "FailedValidation", "PartiallyFailed", "FinalizingPartiallyFailed",
                           "WaitingForPluginOperationsPartiallyFailed"})


def velero_name(backup_id: str, nonce: str) -> str:
    """A DNS-1123 name for the Velero objects of one drill: backup ids carry upper case, drills repeat."""
    base = "".join(ch if ch.isalnum() else "-" for ch in backup_id.lower()).strip("-")
    return f"codemind-{base}"[:(63 - len(nonce) - 1)].rstrip("-") + f"-{nonce}"


def velero_backup(name: str, namespace: str, included: str, labels: Mapping[str, str],
                  backup_id: str) -> dict[str, Any]:
    """A Velero Backup of the platform's production namespace."""
    return {"apiVersion": VELERO_API, "kind": "Backup",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                         "annotations": {"codemind.dev/backup": backup_id}},
            "spec": {"includedNamespaces": [included], "storageLocation": "default"}}


def velero_restore(name: str, namespace: str, backup_name: str, source_ns: str, target_ns: str,
                   labels: Mapping[str, str], backup_id: str) -> dict[str, Any]:
    """A Velero Restore of that Backup, mapping the production namespace onto the DR one when they differ."""
    spec: dict[str, Any] = {"backupName": backup_name, "includedNamespaces": [source_ns]}
    if target_ns != source_ns:
        spec["namespaceMapping"] = {source_ns: target_ns}
    return {"apiVersion": VELERO_API, "kind": "Restore",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                         "annotations": {"codemind.dev/backup": backup_id}},
            "spec": spec}


def velero_verdict(kind: str, where: str, phase: str | None, waited_s: float) -> tuple[bool, str]:
    """(ok, detail) of a Velero object the drill created; without a controller it stays informational."""
    if not phase:
        return True, (f"created {kind} {where}; no Velero controller answered within {waited_s:.1f}s; phase empty "
                      "(informational: this check does not fail the drill)")
    if phase in VELERO_FAILED:
        return False, f"{kind} {where}: Velero reports phase {phase}"
    if phase in VELERO_DONE:
        return True, f"{kind} {where}: phase {phase} after {waited_s:.1f}s"
    return True, f"{kind} {where}: phase {phase} after {waited_s:.1f}s, not finished (informational)"


class DrRelease(BaseModel):
    """A live production release as the restored backup records it: what the DR cluster must run."""

    service: str
    artifact: str
    spec: dict[str, Any] | None = None  # the intent as recorded, for the contract probe's routes


def contract_paths(spec: Mapping[str, Any] | None) -> list[str]:
    """GET paths a release must answer beyond /healthz: the list route of every entity that has one."""
    from codemind_dagster.domain.intent import parse_intent_text

    if not spec:
        return []
    # JSON is YAML: the recorded intent goes through the same validation as a submitted one.
    intent = parse_intent_text(json.dumps(spec), "<restored intent>")
    return ["/" + e.collection for e in intent.spec.entities if "list" in e.operations]
