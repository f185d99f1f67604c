"""`codemind backfill cost-report`: materialize daily cost reports in-process on the local Dagster instance."""

from __future__ import annotations

import sys
import uuid
import warnings
from datetime import date, timedelta
from typing import Any

import click

from codemind_dagster.settings import Settings

BACKFILL_TAG = "codemind/backfill"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def finops_resources(settings: Settings) -> dict[str, Any]:
    """The profile's resources that the finops assets and budget sensor need."""
    from codemind_dagster.resources.profiles import resources_for

    res = resources_for(settings)
    return {k: res[k] for k in ("database", "reports", "llm", "aws_cost")}


def _parse_day(value: str, flag: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date in the form YYYY-MM-DD", param_hint=flag) from None


def partition_days(start: str, end: str, today: date | None = None) -> list[date]:
    """The inclusive range of daily partitions, or a UsageError that says what is wrong with it."""
    from codemind_dagster.assets.finops import PARTITIONS_START, last_complete_day

    first, last = _parse_day(start, "--from"), _parse_day(end, "--to")
    earliest, latest = date.fromisoformat(PARTITIONS_START), last_complete_day(today)
    if first > last:
        raise click.UsageError(f"--from {first} is after --to {last}")
    if first < earliest:
        raise click.UsageError(f"--from {first} is before the first cost-report partition, {earliest}")
    if last > latest:
        raise click.UsageError(f"--to {last} is not a complete day yet: the latest cost-report partition is "
                               f"{latest} (days are UTC; today's spend is still being written)")
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def failure_reason(result) -> str:
    """Why a run failed, in one line: the failing checks if a blocking check stopped it, else the step error."""
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
    if failed_checks:
        return "; ".join(f"check {e.check_name} on {e.asset_key.to_user_string()} failed"
                         + (f" ({_check_detail(e)})" if _check_detail(e) else "") for e in failed_checks)
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            cause = err.cause.message.strip() if err and err.cause else ""
            msg = (err.message.strip() if err else event.message) or "failed"
            return f"step {event.step_key}: {msg}" + (f" caused by {cause}" if cause else "")
    return "the run failed"


def _check_detail(evaluation) -> str:
    keep = ("offending_groups", "report_usd", "ledger_usd", "currencies", "observed_value",
            "aws_report_usd", "aws_cost_explorer_usd")
    md = {k: v.value for k, v in evaluation.metadata.items() if k in keep}
    return ", ".join(f"{k}={v}" for k, v in md.items() if v not in ("none", None))


@click.group()
def backfill() -> None:
    """Rebuild partitioned assets for a range of days on the local Dagster instance."""


@backfill.command("cost-report")
@click.option("--from", "start", required=True, metavar="YYYY-MM-DD", help="First day (UTC), inclusive.")
@click.option("--to", "end", required=True, metavar="YYYY-MM-DD", help="Last day (UTC), inclusive.")
def cost_report(start: str, end: str) -> None:
    """Materialize llm_usage, cost_report and budget_status for each day from --from to --to.

    Runs in this process, one run per day, recorded on the local instance ($CODEMIND_HOME/dagster) and
    visible in the UI; FOCUS files land in $CODEMIND_HOME/reports/focus/<date>.csv. Stops at the first day
    that fails (a blocking data-quality check or an error) and says which and why.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from codemind_dagster.commands.output import console

    days = partition_days(start, end)
    settings = Settings.from_env()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dagster's preview/beta notices would tear up the progress bar
        import dagster as dg

        from codemind_dagster.assets.finops import cost_report_job, finops_assets
        from codemind_dagster.instance import get_instance

        instance = get_instance(settings)
        job = dg.Definitions(assets=finops_assets, jobs=[cost_report_job],
                             resources=finops_resources(settings)).resolve_job_def(cost_report_job.name)
        tag = uuid.uuid4().hex[:8]
        out = console()
        with Progress(TextColumn("[bold]cost report[/] {task.fields[day]}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=out, transient=False) as progress:
            task = progress.add_task("backfill", total=len(days), day=str(days[0]))
            for day in days:
                progress.update(task, day=str(day))
                result = job.execute_in_process(partition_key=day.isoformat(), instance=instance,
                                                raise_on_error=False, run_config=QUIET_RUN_CONFIG,
                                                tags={BACKFILL_TAG: tag})
                if not result.success:
                    progress.stop()
                    done = days.index(day)
                    click.echo(f"error: cost report for {day} failed (run {result.run_id}): "
                               f"{failure_reason(result)}", err=True)
                    click.echo(f"{done} of {len(days)} day(s) done before it; fix the cause and rerun "
                               f"`codemind backfill cost-report --from {day} --to {days[-1]}`", err=True)
                    sys.exit(1)
                progress.advance(task)
    click.echo(f"backfilled {len(days)} day(s) {days[0]}..{days[-1]}: FOCUS reports in "
               f"{settings.reports_dir / 'focus'}")
