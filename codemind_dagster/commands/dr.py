"""`codemind backup` and `codemind dr validate`: backups and restore drills as runs (k8s: Kubernetes Jobs)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

# Events still land in the instance for the UI; the terminal only needs warnings and the result.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _resources(settings) -> dict[str, Any]:
    """The active profile's resources that backups and drills need."""
    from codemind_dagster.resources.profiles import resources_for

    res = resources_for(settings)
    return {k: res[k] for k in ("database", "backups")}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _failure_messages(result) -> list[str]:
    msgs = []
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            msgs.append(data.user_failure_data.description)
        elif data.error:
            msgs.append((data.error.message.strip().splitlines() or ["failed"])[-1])
    return msgs or ["run failed"]


def _metadata_of(result, node: str) -> dict[str, Any]:
    """Metadata of the node's materialization, or of its dg.Failure when the step failed."""
    mats = result.asset_materializations_for_node(node) if result.success else []
    if mats:
        return {k: v.value for k, v in mats[0].metadata.items()}
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.user_failure_data:
            return {k: v.value for k, v in event.step_failure_data.user_failure_data.metadata.items()}
    return {}


def _settings():
    from codemind_dagster.settings import Settings

    return Settings.from_env()


@click.command()
def backup() -> None:
    """Back up the platform DB and artifact store now (a run of the `backups` asset, shown in the UI)."""

    from codemind_dagster.assets.dr import backups_asset

    s = _settings()
    try:
        resources = _resources(s)
    except RuntimeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    md, failures = _run(s, "backup_platform", backups_asset, resources, {"codemind/trigger": "cli"})
    if failures or not md:
        click.echo(f"error: {'; '.join(failures or ['the backup run recorded no backup'])}", err=True)
        sys.exit(1)
    click.echo(f"{md['id']}  {_human(md['size'])} ({md['size']} bytes): {md['tables']} tables, {md['rows']} rows, "
               f"{md['artifacts']} artifact files")


@click.group()
def dr() -> None:
    """Disaster recovery: restore drills of platform backups, with RPO and RTO."""


@dr.command("validate")
@click.option("--backup", "backup_id", metavar="ID", help="Backup to drill (default: the latest successful one).")
@click.option("--json", "as_json", is_flag=True, help="Print the drill as JSON.")
def validate(backup_id: str | None, as_json: bool) -> None:
    """Restore a backup into scratch and verify it (k8s: and redeploy production into dr); exit 1 failed, 2 bad request."""

    from codemind_dagster.assets.dr import BACKUP_TAG, dr_validation
    from codemind_dagster.domain.dr import UnknownBackup
    from codemind_dagster.resources.backups import drill_by_id

    s = _settings()
    try:
        resources = _resources(s)
        store = resources["backups"].store()
        target = store.resolve(backup_id)
    except (UnknownBackup, RuntimeError) as e:
        click.echo(f"error: {e.args[0] if e.args else e}", err=True)
        sys.exit(2)
    md, failures = _run(s, "dr_drill", dr_validation, resources, {BACKUP_TAG: target.id, "codemind/trigger": "cli"})
    drill_id = md.get("drill_id")
    drill = drill_by_id(store.db, drill_id) if drill_id is not None else None
    if drill is None:  # the run failed before a drill could be recorded
        click.echo(f"error: {'; '.join(failures)}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(drill.document(), indent=2))
    else:
        _print_drill(drill)
    if not drill.ok:
        sys.exit(1)


def _run(settings, job: str, asset, resources: dict[str, Any], tags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The asset's run: in this process (local) or as its job's Kubernetes Job (k8s); its metadata and failures."""
    import dagster as dg

    from codemind_dagster.instance import get_instance

    if settings.profile == "k8s":
        return _as_k8s_job(settings, job, tags)
    instance = get_instance(settings)
    try:
        run = dg.materialize([asset], instance=instance, resources=resources, run_config=QUIET, raise_on_error=False,
                             tags=tags)
    finally:
        instance.dispose()
    return _metadata_of(run, asset.key.to_user_string()), [] if run.success else _failure_messages(run)


def _as_k8s_job(settings, job: str, tags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The job launched as a Kubernetes Job, as its schedule or sensor would: its asset's metadata, or why not."""
    import uuid

    import dagster as dg

    from codemind_dagster.driver import Driver

    driver = Driver(settings, progress=lambda msg: click.echo(msg, err=True))
    run_id = str(uuid.uuid4())
    try:
        _, error = driver.launch(job, dg.RunRequest(tags=tags), run_id=run_id)
        events = driver.instance.all_logs(run_id, of_type={dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                           dg.DagsterEventType.STEP_FAILURE})
    finally:
        driver.instance.dispose()
    for e in events:
        data = e.dagster_event.event_specific_data
        if e.dagster_event.is_step_materialization:
            return {k: v.value for k, v in data.materialization.metadata.items()}, []
        if data.user_failure_data and data.user_failure_data.metadata:
            return {k: v.value for k, v in data.user_failure_data.metadata.items()}, [error or "run failed"]
    return {}, [error or "run failed"]


def _print_drill(drill) -> None:
    verdict = "OK" if drill.ok else "FAILED"
    click.echo(f"DR drill of {drill.backup}: {verdict}   RPO {drill.rpo_s:.1f}s   RTO {drill.rto_s:.3f}s")
    width = max(len(c.name) for c in drill.checks)
    for c in drill.checks:
        mark = click.style("ok  ", fg="green") if c.ok else click.style("FAIL", fg="red")
        click.echo(f"  {mark} {c.name:<{width}}  {c.detail}")
