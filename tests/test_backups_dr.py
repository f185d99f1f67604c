"""Backups and DR drills: consistent captures, restore verification that names what broke, the sensor and the CLI."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from codemind_dagster.domain.dr import (
    CHECK_NAMES,
    UnknownBackup,
    canonical_value,
    record_digest,
    sample_offsets,
)
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.artifacts import LocalArtifactStore
from codemind_dagster.resources.backups import LocalBackupStore, drill_history, last_successful_drill_at
from codemind_dagster.resources.database import PlatformDB

BUNDLES = [
    {"service/app.py": "from fastapi import FastAPI\napp = FastAPI()\n", "tests/test_app.py": "def test(): pass\n"},
    {"service/app.py": "print('v2')\n", "service/model.py": "X = 1\n"},
]


def seed(db: PlatformDB, artifacts_root: Path) -> list[str]:
    """A few rows in several tables and two stored bundles, as the pipeline leaves them."""
    digests = [LocalArtifactStore(artifacts_root).put_bundle(files) for files in BUNDLES]
    for name in ("loyalty-points", "invoice-reminders"):
        db.upsert_intent(name, name[:8].ljust(64, "0"), {"kind": "BusinessIntent", "name": name}, f"{name}.yaml")
    for i in range(5):
        db.record_llm_call(task="plan", provider="offline", model="det-1", price_version="2025-01", outcome="ok",
                           intent="loyalty-points", input_tokens=100 + i, output_tokens=10 * i,
                           cost_usd=Decimal("0.00123456") * (i + 1), latency_ms=1.5 * i, cache_hit=i % 2 == 0)
    db.replace_graph("loyalty-points", [{"key": "Customer", "kind": "entity", "properties": {"fields": ["id"]}},
                                        {"key": "Points", "kind": "entity", "properties": {}}],
                     [{"src": "Customer", "dst": "Points", "kind": "has", "properties": {"card": "1:n"}}])
    db.save_test_run("loyalty-points", digests[0], {"passed": 12, "failed": 0, "coverage": 91.5})
    db.add_release("loyalty-points", digests[0], "h" * 64, "run-1")
    dep = db.start_deployment("loyalty-points", "dev", digests[0], "run-2")
    db.finish_deployment(dep, "live", url="http://127.0.0.1:9001", pid=123)
    return digests


def count(db: PlatformDB, table: sa.Table) -> int:
    with db.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> PlatformDB:
    db = PlatformDB(f"sqlite:///{tmp_path / 'platform.db'}")
    db.migrate()
    return db


def make_store(db: PlatformDB, tmp_path: Path, retention: int = 8) -> LocalBackupStore:
    return LocalBackupStore(tmp_path / "backups", db, tmp_path / "artifacts", retention,
                            scratch_root=tmp_path / "scratch")


@pytest.fixture
def seeded(sqlite_db: PlatformDB, tmp_path: Path) -> LocalBackupStore:
    seed(sqlite_db, tmp_path / "artifacts")
    return make_store(sqlite_db, tmp_path)


def checks_of(result) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in result.checks}


# -- backup + drill on both databases -------------------------------------------------------------

def test_backup_and_drill_pass_on_both_databases(db: PlatformDB, tmp_path: Path):
    digests = seed(db, tmp_path / "artifacts")
    store = make_store(db, tmp_path)
    manifest = store.create()

    assert manifest.schema_revision == db.schema_revision()
    assert manifest.source == db.engine.dialect.name
    assert {k: manifest.row_counts[k] for k in ("intents", "llm_ledger", "graph_nodes", "graph_edges",
                                                "test_runs", "releases", "deployments")} == {
        "intents": 2, "llm_ledger": 5, "graph_nodes": 2, "graph_edges": 1, "test_runs": 1, "releases": 1,
        "deployments": 1}
    assert len(manifest.samples["llm_ledger"]) == 3  # first, middle, last
    assert {p.split("/")[1] for p in manifest.artifacts} == set(digests)
    assert f"bundles/{digests[1]}/service/model.py" in manifest.artifacts
    assert (store.root / manifest.id / "manifest.json").is_file()
    assert not list(store.root.glob(".tmp-*"))

    [record] = store.list()
    assert (record.id, record.status) == (manifest.id, "ok") and record.size_bytes > manifest.db.size

    result = store.drill(None)
    assert result.ok, result.failure
    assert [c.name for c in result.checks] == list(CHECK_NAMES)
    assert result.backup == manifest.id and result.id is not None
    sampled = sum(len(v) for v in manifest.samples.values())
    assert checks_of(result)["record_sample"] == (True, f"{sampled} sampled records read back equal")
    assert not any((tmp_path / "scratch").iterdir()), "the scratch restore is cleaned up"
    with db.engine.connect() as c:
        row = c.execute(sa.select(t.dr_drills)).one()
    assert row.ok and row.backup_id == manifest.id and len(row.checks) == len(CHECK_NAMES)


def test_backup_is_consistent_while_writes_go_on(db: PlatformDB, tmp_path: Path):
    seed(db, tmp_path / "artifacts")
    store = make_store(db, tmp_path)
    stop, inserted, errors = threading.Event(), [0], []

    def writer():
        while not stop.is_set():
            try:
                db.record_llm_call(task="code", provider="offline", model="det-1", price_version="2025-01",
                                   outcome="ok", cost_usd=Decimal("0.0001"))
                inserted[0] += 1
            except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(e)
                return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while inserted[0] < 20:
            time.sleep(0.005)
        before = inserted[0]
        manifest = store.create()
        during = inserted[0] - before
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    assert during > 0, "the writer kept committing while the backup ran"
    assert 5 + before <= manifest.row_counts["llm_ledger"] <= count(db, t.llm_ledger)
    result = store.drill(manifest.id)
    assert result.ok, result.failure
    assert checks_of(result)["row_counts"][0]
    assert checks_of(result)["record_sample"][0]


# -- corrupted backups fail with the reason --------------------------------------------------------

def test_truncated_db_file_fails_the_drill_naming_the_sizes(seeded: LocalBackupStore):
    manifest = seeded.create()
    db_file = seeded.root / manifest.id / "platform.db"
    with open(db_file, "r+b") as f:
        f.truncate(12288)
    result = seeded.drill(manifest.id)
    assert not result.ok
    checks = checks_of(result)
    assert checks["backup_readable"] == (False, f"platform.db is 12288 bytes, manifest says {manifest.db.size}")
    assert checks["db_checksum"][0] is False and "manifest says" in checks["db_checksum"][1]
    assert result.failure == f"backup_readable: platform.db is 12288 bytes, manifest says {manifest.db.size}"
    assert checks["artifact_checksums"][0], "the artifacts themselves are intact"
    assert last_successful_drill_at(seeded.db) is None
    with seeded.db.engine.connect() as c:
        row = c.execute(sa.select(t.dr_drills)).one()
    assert not row.ok and "12288 bytes" in row.detail


def test_changed_byte_in_an_artifact_fails_naming_the_file(seeded: LocalBackupStore):
    manifest = seeded.create()
    rel = next(p for p in sorted(manifest.artifacts) if p.endswith("service/model.py"))
    path = seeded.root / manifest.id / "artifacts" / rel
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01  # same size: only a checksum can notice
    path.write_bytes(bytes(data))
    result = seeded.drill(manifest.id)
    assert not result.ok
    checks = checks_of(result)
    assert checks["backup_readable"][0] and checks["db_checksum"][0] and checks["row_counts"][0]
    ok, detail = checks["artifact_checksums"]
    assert not ok and detail.startswith(f"artifacts/{rel}: sha256 ")
    assert result.failure.startswith(f"artifact_checksums: artifacts/{rel}")


def test_unreadable_manifest_fails_and_skips_the_rest(seeded: LocalBackupStore):
    manifest = seeded.create()
    (seeded.root / manifest.id / "manifest.json").write_text("{not json")
    result = seeded.drill(manifest.id)
    checks = checks_of(result)
    assert not result.ok and "manifest.json is not a valid backup manifest" in checks["backup_readable"][1]
    assert all(not ok and detail.startswith("not run") for name, (ok, detail) in checks.items()
               if name != "backup_readable")
    assert result.rpo_s >= 0, "the backups row still says how old the data is"


def test_restored_rows_that_differ_from_the_samples_are_named(seeded: LocalBackupStore, tmp_path: Path):
    manifest = seeded.create()
    # Rewrite a sampled record and the manifest's DB checksum/size, as a bit-rot the checksum missed would.
    from codemind_dagster.resources.backups import sha256_file

    db_file = seeded.root / manifest.id / "platform.db"
    eng = sa.create_engine(f"sqlite:///{db_file}", poolclass=sa.pool.NullPool)
    with eng.begin() as c:
        c.execute(t.intents.update().where(t.intents.c.name == "invoice-reminders").values(source="tampered"))
    eng.dispose()
    doc = json.loads((seeded.root / manifest.id / "manifest.json").read_text())
    doc["db"] = {"sha256": sha256_file(db_file), "size": db_file.stat().st_size}
    (seeded.root / manifest.id / "manifest.json").write_text(json.dumps(doc))
    result = seeded.drill(manifest.id)
    ok, detail = checks_of(result)["record_sample"]
    assert not ok and detail.startswith('intents {"name": "invoice-reminders"}: record differs')


# -- retention, RPO/RTO, unknown backups ------------------------------------------------------------

def test_retention_keeps_the_newest_n(sqlite_db: PlatformDB, tmp_path: Path):
    store = make_store(sqlite_db, tmp_path, retention=2)
    ids = [store.create().id for _ in range(4)]
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == sorted(ids[2:])
    status = {r.id: r.status for r in store.list()}
    assert status == {ids[0]: "expired", ids[1]: "expired", ids[2]: "ok", ids[3]: "ok"}
    assert store.latest().id == ids[3]
    with pytest.raises(UnknownBackup, match="removed by retention"):
        store.drill(ids[0])
    with pytest.raises(UnknownBackup, match="no backup 'bk-nope'"):
        store.drill("bk-nope")
    with pytest.raises(UnknownBackup, match="not a backup id"):
        store.drill("../etc")


def test_a_failed_backup_is_recorded_and_leaves_nothing_behind(seeded: LocalBackupStore, monkeypatch):
    from codemind_dagster.resources.backups import BackupError

    def broken(target):
        raise OSError("disk full")

    monkeypatch.setattr(seeded, "_copy_artifacts", broken)
    with pytest.raises(BackupError, match="disk full"):
        seeded.create()
    [record] = seeded.list()
    assert record.status == "failed" and "OSError: disk full" in record.detail
    assert list(seeded.root.iterdir()) == [] and seeded.latest() is None
    with pytest.raises(UnknownBackup, match="failed when it was taken"):
        seeded.drill(record.id)


def test_drill_without_any_backup_says_so(sqlite_db: PlatformDB, tmp_path: Path):
    with pytest.raises(UnknownBackup, match="no successful backup"):
        make_store(sqlite_db, tmp_path).drill(None)


def test_rpo_grows_with_the_age_of_the_backup_and_rto_is_measured(seeded: LocalBackupStore):
    manifest = seeded.create()
    time.sleep(0.3)
    first = seeded.drill(manifest.id)
    time.sleep(0.2)
    second = seeded.drill(manifest.id)
    assert first.ok and second.ok
    assert first.rpo_s >= 0.3 and second.rpo_s >= first.rpo_s + 0.2
    assert first.rto_s > 0 and second.rto_s > 0
    assert first.rpo_s == pytest.approx((first.started_at - manifest.data_as_of).total_seconds())


def test_last_successful_drill_at(seeded: LocalBackupStore):
    assert last_successful_drill_at(seeded.db) is None
    good = seeded.create()
    before = datetime.now(UTC)
    seeded.drill(good.id)
    at = last_successful_drill_at(seeded.db)
    assert at is not None and at.tzinfo is not None and before <= at <= datetime.now(UTC)
    bad = seeded.create()
    (seeded.root / bad.id / "platform.db").write_bytes(b"")
    assert not seeded.drill(bad.id).ok
    assert last_successful_drill_at(seeded.db) == at, "a failed drill does not count"


# -- pure rules ------------------------------------------------------------------------------------

def test_canonical_values_agree_across_databases():
    aware = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert canonical_value(aware.replace(tzinfo=None)) == canonical_value(aware)
    assert canonical_value(aware.astimezone(timezone(timedelta(hours=2)))) == canonical_value(aware)
    assert canonical_value(Decimal("0.00100000")) == canonical_value(Decimal("0.001"))
    assert record_digest({"a": 1, "b": {"y": 2, "x": [1]}}) == record_digest({"b": {"x": [1], "y": 2}, "a": 1})
    assert sample_offsets(0) == [] and sample_offsets(1) == [0] and sample_offsets(10) == [0, 5, 9]


# -- Dagster: assets, sensor, definitions ------------------------------------------------------------

@pytest.fixture
def dagster_env(settings, sqlite_db: PlatformDB, tmp_path: Path):
    from codemind_dagster.resources.backups import BackupStoreResource
    from codemind_dagster.resources.platform import DatabaseResource

    seed(sqlite_db, tmp_path / "artifacts")
    database = DatabaseResource(url=sqlite_db.url)
    resources = {"database": database, "backups": BackupStoreResource(
        database=database, root=str(tmp_path / "backups"), artifacts_root=str(tmp_path / "artifacts"),
        retention=3, scratch_root=str(tmp_path / "scratch"))}
    instance = dg.DagsterInstance.ephemeral()
    yield resources, instance
    instance.dispose()


def tick(resources, instance, cursor=None):
    from codemind_dagster.assets.dr import dr_sensor

    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
        return dr_sensor(ctx)


def test_dr_sensor_requests_one_drill_per_new_backup(dagster_env):
    resources, instance = dagster_env
    store = resources["backups"].store()
    first = tick(resources, instance)
    assert not first.run_requests
    ids = [store.create().id for _ in range(2)]
    second = tick(resources, instance, first.cursor)
    assert [r.tags["codemind/backup"] for r in second.run_requests] == ids
    assert len({r.run_key for r in second.run_requests}) == 2
    assert not tick(resources, instance, second.cursor).run_requests
    third_id = store.create().id
    third = tick(resources, instance, second.cursor)
    assert [r.tags["codemind/backup"] for r in third.run_requests] == [third_id]
    # A sensor starting without a cursor skips backups that a drill already covered.
    store.drill(ids[0])
    assert [r.tags["codemind/backup"] for r in tick(resources, instance).run_requests] == [ids[1], third_id]


def test_assets_take_a_backup_and_drill_it(dagster_env):
    from codemind_dagster.assets.dr import backups_asset, dr_validation

    resources, instance = dagster_env
    made = dg.materialize([backups_asset], instance=instance, resources=resources)
    md = made.asset_materializations_for_node("backups")[0].metadata
    assert {"id", "size", "tables", "rows", "artifacts"} <= set(md)
    backup_id = md["id"].value
    assert md["rows"].value >= 12 and md["artifacts"].value == 6

    drilled = dg.materialize([dr_validation], instance=instance, resources=resources,
                             tags={"codemind/backup": backup_id})
    md = drilled.asset_materializations_for_node("dr_validation")[0].metadata
    assert md["ok"].value is True and md["rto_s"].value > 0
    assert [c["name"] for c in md["checks"].value] == list(CHECK_NAMES)
    assert backup_id in md["history"].value and md["history"].value.startswith("| drill |")

    store = resources["backups"].store()
    with open(store.root / backup_id / "platform.db", "r+b") as f:
        f.truncate(4096)
    failed = dg.materialize([dr_validation], instance=instance, resources=resources, raise_on_error=False,
                            tags={"codemind/backup": backup_id})
    assert not failed.success
    [event] = [e for e in failed.all_events if e.is_step_failure]
    assert "platform.db is 4096 bytes, manifest says" in event.step_failure_data.user_failure_data.description
    assert [r["ok"] for r in drill_history(store.db)] == [False, True], "the failed drill is recorded first"


def test_module_definitions_load_with_the_resources_merged(dagster_env):
    from codemind_dagster.assets.dr import defs

    resources, _ = dagster_env
    merged = dg.Definitions.merge(defs, dg.Definitions(resources=resources))
    assert merged.resolve_job_def("dr_drill") and merged.resolve_job_def("backup_platform")
    schedule = merged.resolve_schedule_def("backup_schedule")
    assert schedule.cron_schedule == "0 */6 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert merged.resolve_sensor_def("dr_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    graph = merged.resolve_asset_graph()
    assert graph.get(dg.AssetKey("dr_validation")).parent_keys == {dg.AssetKey("backups")}
    assert graph.get(dg.AssetKey("backups")).group_name == "platform"


# -- CLI -------------------------------------------------------------------------------------------

@pytest.fixture
def cli_home(settings):
    db = PlatformDB(settings.db_url)
    db.migrate()
    seed(db, settings.artifacts_dir)
    return settings, db


def test_cli_backup_then_validate_json(cli_home):
    from click.testing import CliRunner

    from codemind_dagster.commands.dr import backup, dr

    settings, db = cli_home
    runner = CliRunner()
    made = runner.invoke(backup)
    assert made.exit_code == 0, made.output
    backup_id = made.stdout.split()[0]
    assert backup_id.startswith("bk-") and "bytes" in made.stdout
    assert (settings.backups_dir / backup_id / "manifest.json").is_file()

    ok = runner.invoke(dr, ["validate", "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert set(doc) == {"backup", "ok", "rpo_s", "rto_s", "checks"}
    assert doc["backup"] == backup_id and doc["ok"] is True and doc["rto_s"] >= 0 and doc["rpo_s"] > 0
    assert [set(c) for c in doc["checks"]] == [{"name", "ok", "detail"}] * len(CHECK_NAMES)

    path = next((settings.backups_dir / backup_id / "artifacts" / "bundles").rglob("app.py"))
    path.write_bytes(path.read_bytes().replace(b"app", b"apq", 1))
    bad = runner.invoke(dr, ["validate", "--backup", backup_id, "--json"])
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["artifact_checksums"] and "app.py" in failed[0]["detail"]

    text = runner.invoke(dr, ["validate", "--backup", backup_id])
    assert text.exit_code == 1 and "FAILED" in text.stdout and "artifact_checksums" in text.stdout
    assert last_successful_drill_at(db) is not None
    # Every drill landed in the instance as a run, so the UI shows it.
    from codemind_dagster.instance import get_instance

    instance = get_instance(settings)
    try:
        assert len(instance.get_runs()) == 4
    finally:
        instance.dispose()


def test_cli_usage_errors_exit_2(cli_home):
    from click.testing import CliRunner

    from codemind_dagster.commands.dr import dr

    runner = CliRunner()
    none_yet = runner.invoke(dr, ["validate"])
    assert none_yet.exit_code == 2 and "run `codemind backup` first" in none_yet.stderr
    unknown = runner.invoke(dr, ["validate", "--backup", "bk-missing", "--json"])
    assert unknown.exit_code == 2 and "no backup 'bk-missing'" in unknown.stderr and unknown.stdout == ""
