"""Platform backups and the DR drill that restores and verifies each one."""

import json
from datetime import datetime

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.resources import tables as t
from codemind_dagster.resources.backups import BackupError, BackupStoreResource, drill_history
from codemind_dagster.resources.database import as_utc

BACKUP_TAG = "codemind/backup"
BACKUP_CRON = "0 */6 * * *"
OWNERS = ["team:platform"]


@dg.asset(
    name="backups", group_name="platform", kinds={"sqlite", "python"}, owners=OWNERS,
    description="A consistent backup of the platform database and the artifact store; each materialization "
                "takes one, and only the newest `backup_retention` are kept.",
)
def backups_asset(context: dg.AssetExecutionContext, backups: BackupStoreResource) -> dg.MaterializeResult:
    store = backups.store()
    try:
        manifest = store.create()
    except BackupError as e:
        raise dg.Failure(str(e)) from e
    context.log.info(f"backup {manifest.id}: {len(manifest.row_counts)} tables, {manifest.total_rows} rows, "
                     f"{len(manifest.artifacts)} artifact files")
    size = sum(r.size_bytes for r in store.list() if r.id == manifest.id)
    return dg.MaterializeResult(metadata={
        "id": manifest.id,
        "size": dg.MetadataValue.int(size),
        "tables": len(manifest.row_counts),
        "rows": manifest.total_rows,
        "row_counts": dg.MetadataValue.json(manifest.row_counts),
        "artifacts": len(manifest.artifacts),
        "schema_revision": manifest.schema_revision or "none",
        "data_as_of": manifest.data_as_of.isoformat(),
        "location": dg.MetadataValue.path(str(store.root / manifest.id)),
    })


@dg.asset(
    group_name="platform", deps=[backups_asset], kinds={"python"}, owners=OWNERS,
    description="Restore drill of a backup (run tag codemind/backup, else the latest): restore into scratch, "
                "verify schema, rows, sampled records and artifact checksums, and measure RPO and RTO. In the k8s "
                "profile it also redeploys every live production release of the backup into the dr cluster, "
                "probes each over the HTTP contract and tears them down, and creates Velero Backup/Restore "
                "objects; RTO then covers restore, redeploys and probes.",
)
def dr_validation(context: dg.AssetExecutionContext, backups: BackupStoreResource) -> dg.MaterializeResult:
    from codemind_dagster.domain.dr import UnknownBackup, history_markdown

    store = backups.store()
    try:
        result = store.drill(context.run.tags.get(BACKUP_TAG))
    except UnknownBackup as e:
        raise dg.Failure(str(e)) from e
    metadata = {
        "backup": result.backup,
        "drill_id": dg.MetadataValue.int(result.id),
        "ok": dg.MetadataValue.bool(result.ok),
        "rpo_s": dg.MetadataValue.float(round(result.rpo_s, 3)),
        "rto_s": dg.MetadataValue.float(round(result.rto_s, 3)),
        "checks": dg.MetadataValue.json([c.model_dump() for c in result.checks]),
        "history": dg.MetadataValue.md(history_markdown(drill_history(store.db, 20))),
    }
    if not result.ok:
        # The drill is already recorded in dr_drills: a failed drill is history too.
        raise dg.Failure(description=f"DR drill of {result.backup} failed: {result.failure}", metadata=metadata)
    redeployed = sum(1 for c in result.checks if c.name.startswith("dr_contract:"))
    context.log.info(f"drill of {result.backup} ok: RPO {result.rpo_s:.1f}s, RTO {result.rto_s:.2f}s"
                     + (f", {redeployed} release(s) served their contract in dr" if redeployed else ""))
    return dg.MaterializeResult(metadata=metadata)


backup_platform = dg.define_asset_job(
    "backup_platform", selection=dg.AssetSelection.assets(backups_asset), executor_def=dg.in_process_executor,
    description="Take a backup of the platform DB and artifacts.",
)

dr_drill = dg.define_asset_job(
    "dr_drill", selection=dg.AssetSelection.assets(dr_validation), executor_def=dg.in_process_executor,
    description="Restore a backup into scratch and verify it; requested by dr_sensor for every new backup.",
)

backup_schedule = dg.ScheduleDefinition(
    name="backup_schedule", job=backup_platform, cron_schedule=BACKUP_CRON, execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING, description="A platform backup every 6 hours.",
)


def _parse_cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    c = json.loads(raw)
    return datetime.fromisoformat(c["created_at"]), c["id"]


@dg.sensor(job=dr_drill, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Starts a DR drill for every new successful backup.")
def dr_sensor(context: dg.SensorEvaluationContext, backups: BackupStoreResource) -> dg.SensorResult:
    db = backups.store().db
    cursor = _parse_cursor(context.cursor)
    q = sa.select(t.backups.c.id, t.backups.c.created_at).where(t.backups.c.status == "ok")
    with db.engine.connect() as c:
        if cursor:
            q = q.where(t.backups.c.created_at >= cursor[0])
        rows = [(as_utc(r.created_at), r.id) for r in c.execute(q)]
        # Without a cursor (first tick) only backups no drill has covered yet are new.
        drilled = set() if cursor else set(c.execute(sa.select(t.dr_drills.c.backup_id).distinct()).scalars())
    # (created_at, id) orders backups even when two share a timestamp; ids are unique.
    new = sorted(r for r in rows if (cursor is None or r > cursor) and r[1] not in drilled)
    last = max(rows + ([cursor] if cursor else []), default=None)
    next_cursor = json.dumps({"created_at": last[0].isoformat(), "id": last[1]}) if last else context.cursor
    if not new:
        return dg.SensorResult(skip_reason="no new backup", cursor=next_cursor)
    context.log.info(f"drilling {len(new)} new backup(s): {', '.join(i for _, i in new)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dr-drill:{backup_id}", tags={BACKUP_TAG: backup_id})
                      for _, backup_id in new],
        cursor=next_cursor,
    )


defs = dg.Definitions(
    assets=[backups_asset, dr_validation],
    jobs=[backup_platform, dr_drill],
    schedules=[backup_schedule],
    sensors=[dr_sensor],
)
