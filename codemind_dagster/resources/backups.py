"""Local backups of the platform DB and artifact store, and the restore drills that prove them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.domain.dr import (
    ARTIFACTS_DIR,
    CHECK_NAMES,
    DB_FILE,
    MANIFEST_FILE,
    BackupManifest,
    BackupRecord,
    DrillCheck,
    DrillResult,
    FileDigest,
    RecordSample,
    UnknownBackup,
    check_size,
    compare_digests,
    compare_row_counts,
    record_digest,
    sample_offsets,
    summarize,
)
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.database import MIGRATIONS, PlatformDB, as_utc, now
from codemind_dagster.resources.platform import DatabaseResource

TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600
_CHUNK = 1 << 20


class BackupError(RuntimeError):
    """A backup could not be taken; its row is recorded as failed with this reason."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: Path, dst: Path) -> FileDigest:
    # Hash the bytes as they are written, so the manifest describes the copy, not a later state of the source.
    h, size = hashlib.sha256(), 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    shutil.copystat(src, dst)
    return FileDigest(sha256=h.hexdigest(), size=size)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sqlite_readonly(path: Path) -> sa.Engine:
    """A read-only engine on a snapshot file: a drill must never change what it verifies."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True),
                            poolclass=sa.pool.NullPool)


@lru_cache(maxsize=1)
def code_schema_head() -> str | None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def _revision(conn: sa.Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("select version_num from alembic_version")).scalar()


def _pk_key(table: sa.Table, row: Any) -> dict[str, Any]:
    return {c.name: row._mapping[c.name] for c in table.primary_key.columns}


def _describe(conn: sa.Connection, sample_size: int) -> tuple[str | None, dict[str, int], dict[str, list[RecordSample]]]:
    """Schema revision, row counts and record samples, all read in the caller's (snapshot) transaction."""
    counts: dict[str, int] = {}
    samples: dict[str, list[RecordSample]] = {}
    for table in t.metadata.sorted_tables:
        n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        counts[table.name] = n
        pk = list(table.primary_key.columns)
        if not pk:
            continue
        picked = []
        for offset in sample_offsets(n, sample_size):
            row = conn.execute(sa.select(table).order_by(*pk).offset(offset).limit(1)).first()
            if row is not None:
                picked.append(RecordSample(key=_pk_key(table, row), digest=record_digest(row._mapping)))
        if picked:
            samples[table.name] = picked
    return _revision(conn), counts, samples


def _as_utc_row(row: dict[str, Any]) -> dict[str, Any]:
    # SQLite stores timezone-aware columns without their zone: write them as UTC, as the platform does.
    return {k: (as_utc(v).astimezone(UTC) if isinstance(v, datetime) else v) for k, v in row.items()}


class LocalBackupStore:
    """Backups under `root/<id>/` (manifest.json, platform.db, artifacts/); kube_dr.py extends the drill in k8s."""

    def __init__(self, root: Path, db: PlatformDB, artifacts_root: Path, retention: int = 8, *,
                 scratch_root: Path | None = None, sample_size: int = 3):
        if retention < 1:
            raise ValueError("backup retention must keep at least one backup")
        self.root = Path(root)
        self.db = db
        self.artifacts_root = Path(artifacts_root)
        self.retention = retention
        self.scratch_root = Path(scratch_root) if scratch_root else self.root / ".scratch"
        self.sample_size = sample_size

    # -- taking backups --------------------------------------------------------------------------
    def create(self) -> BackupManifest:
        """Snapshot the DB, then copy completed bundles, then publish the backup by one rename.

        Consistency of the pair: bundles are content-addressed and immutable, and a bundle becomes
        visible (its `.manifest.json` inside a renamed directory) before any DB row refers to it,
        because the pipeline stores the bundle first and records the release after. So every bundle
        the DB snapshot references already exists, complete, when the copy starts after the
        snapshot. Bundles that appear later are copied too; they are harmless extras nothing refers
        to. Nothing deletes bundles today; a future artifact GC must not run during a backup.
        """
        created = now()
        backup_id = f"bk-{created:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / backup_id
        tmp = self.root / f"{TMP_PREFIX}{backup_id}"
        tmp.mkdir()
        try:
            data_as_of, source, revision, counts, samples = self._snapshot_db(tmp / DB_FILE)
            db_digest = FileDigest(sha256=sha256_file(tmp / DB_FILE), size=(tmp / DB_FILE).stat().st_size)
            artifacts = self._copy_artifacts(tmp / ARTIFACTS_DIR)
            manifest = BackupManifest(
                id=backup_id, created_at=created, data_as_of=data_as_of, source=source,
                schema_revision=revision, db=db_digest, row_counts=counts, samples=samples, artifacts=artifacts)
            (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            # A backup exists only whole: readers never see a directory without its manifest.
            os.rename(tmp, final)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = f"{type(e).__name__}: {e}"
            # The DB may be what failed; then only the raised error can tell.
            with contextlib.suppress(Exception):
                self._record_backup(backup_id, created, created, final, 0, "failed", reason[:2000])
            raise BackupError(f"backup {backup_id} failed: {reason}") from e
        self._record_backup(backup_id, created, data_as_of, final, _dir_size(final), "ok", None)
        self.apply_retention()
        return manifest

    def _snapshot_db(self, target: Path):
        engine = self.db.engine
        if engine.dialect.name == "sqlite":
            return self._snapshot_sqlite(Path(engine.url.database), target)
        return self._snapshot_sql(target)

    def _snapshot_sqlite(self, source: Path, target: Path):
        if not source.is_file():
            raise BackupError(f"platform database {source} does not exist")
        # The data is as of the moment the backup's read transaction starts, just after this; RPO errs high.
        data_as_of = now()
        src = sqlite3.connect(source, timeout=30)
        dst = sqlite3.connect(target)
        try:
            # pages=-1 copies everything in one step under one read transaction: in WAL mode writers go on,
            # and the copy is the database as of that transaction's start, never a torn mix.
            src.backup(dst, pages=-1)
            # One self-contained file: no -wal sidecar for the checksum to miss.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        eng = _sqlite_readonly(target)
        try:
            with eng.connect() as conn:
                revision, counts, samples = _describe(conn, self.sample_size)
        finally:
            eng.dispose()
        return data_as_of, "sqlite", revision, counts, samples

    def _snapshot_sql(self, target: Path):
        """PostgreSQL (or any server DB): one REPEATABLE READ transaction copied table by table into SQLite."""
        dst = sa.create_engine(f"sqlite:///{target}", poolclass=sa.pool.NullPool)
        try:
            with self.db.engine.connect() as conn:
                conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
                with conn.begin():
                    # The snapshot is taken by the first statement below; RPO errs high by this instant.
                    data_as_of = now()
                    revision, counts, samples = _describe(conn, self.sample_size)
                    with dst.begin() as d:
                        t.metadata.create_all(d)
                        d.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                                          "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
                        if revision:
                            d.execute(sa.text("INSERT INTO alembic_version VALUES (:v)"), {"v": revision})
                        for table in t.metadata.sorted_tables:
                            rows = conn.execute(sa.select(table).execution_options(yield_per=1000))
                            for batch in rows.partitions(1000):
                                d.execute(table.insert(), [_as_utc_row(dict(r._mapping)) for r in batch])
        finally:
            dst.dispose()
        return data_as_of, self.db.engine.dialect.name, revision, counts, samples

    def _copy_artifacts(self, target: Path) -> dict[str, FileDigest]:
        files: dict[str, FileDigest] = {}
        bundles = self.artifacts_root / "bundles"
        if not bundles.is_dir():
            return files
        for bundle in sorted(bundles.iterdir()):
            # Hidden directories are bundles still being written; only a renamed bundle with its manifest is whole.
            if bundle.name.startswith(".") or not (bundle / ".manifest.json").is_file():
                continue
            for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
                if "__pycache__" in path.parts or path.suffix == ".pyc":
                    continue  # derived, and may be written while we copy
                rel = path.relative_to(self.artifacts_root).as_posix()
                files[rel] = _copy_hashing(path, target / rel)
        return files

    def _record_backup(self, backup_id: str, created: datetime, data_as_of: datetime, location: Path,
                       size: int, status: str, detail: str | None) -> None:
        with self.db.tx() as c:
            c.execute(t.backups.insert().values(
                id=backup_id, created_at=created, data_as_of=data_as_of, location=str(location.resolve()),
                size_bytes=size, status=status, detail=detail))

    def apply_retention(self) -> list[str]:
        """Keep the newest `retention` ok backups; older ones lose their files and become `expired`.

        Rows are kept (not deleted) so drill history keeps pointing at a known backup and the UI can
        say why an old backup can no longer be restored.
        """
        with self.db.engine.connect() as c:
            ok = list(c.execute(sa.select(t.backups.c.id, t.backups.c.location).where(t.backups.c.status == "ok")
                                .order_by(t.backups.c.created_at.desc(), t.backups.c.id.desc())))
        expired = []
        root = self.root.resolve()
        for row in ok[self.retention:]:
            location = Path(row.location)
            # Never delete outside the backup root, whatever a row says.
            if location.resolve().is_relative_to(root) and location.resolve() != root:
                shutil.rmtree(location, ignore_errors=True)
            with self.db.tx() as c:
                c.execute(t.backups.update().where(t.backups.c.id == row.id).values(
                    status="expired", detail=f"removed by retention (keeping the newest {self.retention})"))
            expired.append(row.id)
        cutoff = time.time() - STALE_TMP_S
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            # Left by a crashed backup; an hour is far longer than any backup takes.
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        return expired

    # -- reading ------------------------------------------------------------------------------------
    def list(self) -> list[BackupRecord]:
        """Every backup ever attempted, newest first (ok, failed and expired)."""
        with self.db.engine.connect() as c:
            rows = c.execute(sa.select(t.backups).order_by(t.backups.c.created_at.desc(), t.backups.c.id.desc()))
            return [_record(r) for r in rows]

    def latest(self) -> BackupRecord | None:
        return next((r for r in self.list() if r.status == "ok"), None)

    def manifest(self, backup_id: str) -> BackupManifest:
        return BackupManifest.model_validate_json((self.resolve(backup_id).location_path / MANIFEST_FILE).read_text())

    def resolve(self, backup_id: str | None) -> _Resolved:
        """The backup a drill restores; UnknownBackup with the reason when there is none to restore."""
        if backup_id is None:
            latest = self.latest()
            if latest is None:
                raise UnknownBackup("there is no successful backup to validate yet; run `codemind backup` first")
            return _Resolved(latest.id, Path(latest.location), latest.data_as_of)
        if not backup_id or "/" in backup_id or "\\" in backup_id or backup_id.startswith("."):
            raise UnknownBackup(f"{backup_id!r} is not a backup id")
        with self.db.engine.connect() as c:
            row = c.execute(sa.select(t.backups).where(t.backups.c.id == backup_id)).first()
        if row is None:
            # A backup directory brought over from elsewhere (the DR site) is restorable without its row.
            if (self.root / backup_id / MANIFEST_FILE).is_file():
                return _Resolved(backup_id, self.root / backup_id, None)
            known = [r.id for r in self.list() if r.status == "ok"][:5]
            raise UnknownBackup(f"no backup {backup_id!r}" + (f"; recent ones: {', '.join(known)}" if known else ""))
        if row.status == "expired":
            raise UnknownBackup(f"backup {backup_id} was removed by retention; it can no longer be restored")
        if row.status != "ok":
            raise UnknownBackup(f"backup {backup_id} failed when it was taken: {row.detail or row.status}")
        return _Resolved(row.id, Path(row.location), as_utc(row.data_as_of))

    # -- drills -------------------------------------------------------------------------------------
    def drill(self, backup_id: str | None = None, scratch_root: Path | None = None) -> DrillResult:
        """Restore a backup (None: the latest ok one) into scratch, verify it, and record the drill."""
        target = self.resolve(backup_id)
        scratch_parent = Path(scratch_root) if scratch_root else self.scratch_root
        scratch_parent.mkdir(parents=True, exist_ok=True)
        started = now()
        t0 = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=f"drill-{target.id}-", dir=scratch_parent))
        clock: list[float] = []

        def stop_clock() -> None:
            if not clock:
                clock.append(time.perf_counter() - t0)

        try:
            checks, manifest = _restore_and_verify(target.location_path, scratch / "restore")
            checks += self.recover(target.id, scratch / "restore", manifest, checks, stop_clock)
            stop_clock()
            rto = clock[0]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        data_as_of = manifest.data_as_of if manifest else target.data_as_of
        # -1: the data's time is unknown (no readable manifest and no backups row); the drill fails anyway.
        rpo = (started - as_utc(data_as_of)).total_seconds() if data_as_of else -1.0
        result = DrillResult(backup=target.id, ok=all(c.ok for c in checks), rpo_s=rpo, rto_s=rto, checks=checks,
                             started_at=started, finished_at=now(), data_as_of=data_as_of)
        return self.record_drill(result)

    def recover(self, backup_id: str, restored: Path, manifest: BackupManifest | None,
                checks: list[DrillCheck], stop_clock: Callable[[], None]) -> list[DrillCheck]:
        """Recovery steps beyond the verified restore, with their checks; locally the restore is the recovery."""
        return []

    def record_drill(self, result: DrillResult) -> DrillResult:
        with self.db.tx() as c:
            drill_id = c.execute(t.dr_drills.insert().values(
                backup_id=result.backup, started_at=result.started_at, finished_at=result.finished_at,
                ok=result.ok, rpo_s=result.rpo_s, rto_s=result.rto_s,
                checks=[ch.model_dump() for ch in result.checks],
                detail=(result.failure or "all checks passed")[:2000])).inserted_primary_key[0]
        return result.model_copy(update={"id": drill_id})


class _Resolved:
    def __init__(self, backup_id: str, location: Path, data_as_of: datetime | None):
        self.id = backup_id
        self.location_path = location
        self.data_as_of = data_as_of


def _record(row: Any) -> BackupRecord:
    return BackupRecord(id=row.id, created_at=as_utc(row.created_at), data_as_of=as_utc(row.data_as_of),
                        location=row.location, size_bytes=row.size_bytes, status=row.status, detail=row.detail)


def _restore_and_verify(location: Path, restored: Path) -> tuple[list[DrillCheck], BackupManifest | None]:
    results: dict[str, tuple[bool, str]] = {}

    def skipped(reason: str) -> list[DrillCheck]:
        return [DrillCheck(name=n, ok=results[n][0], detail=results[n][1]) if n in results
                else DrillCheck(name=n, ok=False, detail=f"not run: {reason}") for n in CHECK_NAMES]

    if not (location / MANIFEST_FILE).is_file():
        what = "directory" if not location.is_dir() else MANIFEST_FILE
        results["backup_readable"] = (False, f"backup {what} missing at {location}")
        return skipped("the backup is not readable"), None
    # The restore: a full copy into scratch, as a recovery would do; everything below reads only the copy.
    shutil.copytree(location, restored)
    try:
        manifest = BackupManifest.model_validate_json((restored / MANIFEST_FILE).read_text())
    except Exception as e:  # noqa: BLE001 - any parse error makes the backup unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        results["backup_readable"] = (False, f"{MANIFEST_FILE} is not a valid backup manifest: {first}")
        return skipped("the backup is not readable"), None

    db_path = restored / manifest.db_file
    problems = [check_size(manifest.db_file, db_path.stat().st_size if db_path.is_file() else None, manifest.db.size)]
    for rel, digest in sorted(manifest.artifacts.items()):
        p = restored / ARTIFACTS_DIR / rel
        problems.append(check_size(f"{ARTIFACTS_DIR}/{rel}", p.stat().st_size if p.is_file() else None, digest.size))
    results["backup_readable"] = summarize(
        [p for p in problems if p],
        f"manifest v{manifest.format}; {manifest.db_file} {manifest.db.size} bytes; "
        f"{len(manifest.artifacts)} artifact files")

    if not db_path.is_file():
        results["db_checksum"] = (False, f"{manifest.db_file} is missing")
    else:
        got = sha256_file(db_path)
        results["db_checksum"] = (True, f"sha256 {got[:12]}… matches") if got == manifest.db.sha256 else (
            False, f"{manifest.db_file}: sha256 {got[:12]}…, manifest says {manifest.db.sha256[:12]}…")

    if db_path.is_file():
        _verify_database(db_path, manifest, results)

    actual = {rel: sha256_file(restored / ARTIFACTS_DIR / rel) if (restored / ARTIFACTS_DIR / rel).is_file()
              else None for rel in manifest.artifacts}
    results["artifact_checksums"] = summarize(
        [f"{ARTIFACTS_DIR}/{p}" for p in compare_digests(manifest.artifacts, actual)],
        f"{len(manifest.artifacts)} files match their sha256")
    return skipped(f"{manifest.db_file} is missing"), manifest


def _verify_database(db_path: Path, manifest: BackupManifest, results: dict[str, tuple[bool, str]]) -> None:
    engine = _sqlite_readonly(db_path)
    try:
        with engine.connect() as conn:
            for name, fn in (("schema_version", _check_schema), ("row_counts", _check_counts),
                             ("record_sample", _check_samples)):
                try:
                    results[name] = fn(conn, manifest)
                except Exception as e:  # noqa: BLE001 - a damaged file surfaces as any DB error
                    results[name] = (False, f"restored database unreadable: {type(e).__name__}: {e}"[:500])
    finally:
        engine.dispose()


def _check_schema(conn: sa.Connection, manifest: BackupManifest) -> tuple[bool, str]:
    restored, head = _revision(conn), code_schema_head()
    if restored != manifest.schema_revision:
        return False, f"restored schema revision {restored}, manifest says {manifest.schema_revision}"
    if restored != head:
        return False, f"restored schema revision {restored}, this code's migrations head is {head}"
    return True, f"revision {restored} (code head)"


def _check_counts(conn: sa.Connection, manifest: BackupManifest) -> tuple[bool, str]:
    names = set(sa.inspect(conn).get_table_names())
    actual: dict[str, int | None] = {}
    for table in manifest.row_counts:
        actual[table] = (conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar_one()
                         if table in names else None)
    return summarize(compare_row_counts(manifest.row_counts, actual),
                     f"{len(manifest.row_counts)} tables, {manifest.total_rows} rows match")


def _check_samples(conn: sa.Connection, manifest: BackupManifest) -> tuple[bool, str]:
    problems, n = [], 0
    for table_name, picks in sorted(manifest.samples.items()):
        table = t.metadata.tables.get(table_name)
        if table is None:
            problems.append(f"{table_name}: not a table of this code's schema")
            continue
        for sample in picks:
            n += 1
            cond = sa.and_(*(table.c[k] == v for k, v in sample.key.items()))
            row = conn.execute(sa.select(table).where(cond)).first()
            key = json.dumps(sample.key, sort_keys=True, default=str)
            if row is None:
                problems.append(f"{table_name} {key}: record missing after restore")
            elif record_digest(row._mapping) != sample.digest:
                problems.append(f"{table_name} {key}: record differs from the backup")
    return summarize(problems, f"{n} sampled records read back equal")


def last_successful_drill_at(db: PlatformDB) -> datetime | None:
    """When the newest passing DR drill finished; promotion to production can require it to be recent."""
    return db.last_successful_drill_at()


def drill_history(db: PlatformDB, limit: int = 20) -> list[dict[str, Any]]:
    """The newest drills first."""
    with db.engine.connect() as c:
        rows = c.execute(sa.select(t.dr_drills).order_by(t.dr_drills.c.id.desc()).limit(limit))
        return [dict(r._mapping) for r in rows]


def drill_by_id(db: PlatformDB, drill_id: int) -> DrillResult | None:
    with db.engine.connect() as c:
        r = c.execute(sa.select(t.dr_drills).where(t.dr_drills.c.id == drill_id)).first()
    if r is None:
        return None
    return DrillResult(backup=r.backup_id, ok=r.ok, rpo_s=r.rpo_s, rto_s=r.rto_s,
                       checks=[DrillCheck.model_validate(ch) for ch in r.checks],
                       started_at=as_utc(r.started_at), finished_at=as_utc(r.finished_at), id=r.id)


class BackupStoreResource(dg.ConfigurableResource):
    """Backups of the platform DB and artifacts, and restore drills (k8s: KubeBackupStoreResource in kube_dr.py)."""

    database: DatabaseResource
    root: str
    artifacts_root: str
    retention: int = 8
    scratch_root: str | None = None

    def store(self) -> LocalBackupStore:
        return LocalBackupStore(Path(self.root), self.database.client(), Path(self.artifacts_root),
                                self.retention, scratch_root=Path(self.scratch_root) if self.scratch_root else None)
