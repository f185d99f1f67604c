"""FinOps: the LLM ledger aggregated per day by SQL, the FOCUS 1.2 cost report and budget status, GX-checked."""

import csv
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.domain import focus
from codemind_dagster.resources import budget_alerts as ba
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.aws_cost import AwsCostResource
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.platform import DatabaseResource, ModelRouterResource, ReportsResource
from codemind_dagster.sensors.budget import budget_sensor

OWNERS = ["team:platform"]
GROUP = "finops"
PARTITIONS_START = "2026-01-01"
daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START)
# No BackfillPolicy is set: the default, one run per day, is the one wanted (each day is written, checked and
# can fail on its own, so one bad day hides no other); single_run would not fit per-day files and checks.
GROUP_KEYS = ("intent", "task", "provider", "model", "price_version")
TOLERANCE_USD = 1e-6


# -- SQL ---------------------------------------------------------------------------------------------------
SUMMED = ("calls", "cache_hits", "errors", "null_costs", *focus.TOKEN_COLUMNS)


def _aggregate(db: PlatformDB, start: datetime, end: datetime) -> list[dict[str, Any]]:
    led = t.llm_ledger.c
    keys = [led[k] for k in GROUP_KEYS]
    q = (sa.select(
            *keys,
            sa.func.count().label("calls"),
            sa.func.sum(sa.case((led.cache_hit, 1), else_=0)).label("cache_hits"),
            sa.func.sum(sa.case((led.outcome != "ok", 1), else_=0)).label("errors"),
            *(sa.func.sum(led[c]).label(c) for c in focus.TOKEN_COLUMNS),
            sa.func.sum(led.cost_usd).label("cost_usd"),
            sa.func.min(led.cost_usd).label("min_cost_usd"),
            (sa.func.count() - sa.func.count(led.cost_usd)).label("null_costs"))
         .where(led.at >= start, led.at < end)
         .group_by(*keys)
         # SQLite would pick the `at` index and sort the whole day for GROUP BY; the covering report
         # index hands it the rows already in group order. PostgreSQL plans this well by itself.
         .with_hint(t.llm_ledger, "INDEXED BY ix_llm_ledger_report", "sqlite"))
    with db.engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(q)]


def aggregate_day(db: PlatformDB, day: date) -> list[dict[str, Any]]:
    """The day's ledger grouped by intent, task, provider, model and price version, summed in the database."""
    start, end = focus.day_bounds(day)
    parts = [_aggregate(db, start, end)]
    merged: dict[tuple, dict[str, Any]] = {}
    for part in parts:
        for r in part:
            for k in SUMMED:
                r[k] = int(r[k] or 0)
            r["cost_usd"] = focus.dec(r["cost_usd"])
            r["min_cost_usd"] = None if r["min_cost_usd"] is None else focus.dec(r["min_cost_usd"])
            key = tuple(r[k] for k in GROUP_KEYS)
            m = merged.get(key)
            if m is None:
                merged[key] = r
                continue
            for k in (*SUMMED, "cost_usd"):
                m[k] += r[k]
            mins = [v for v in (m["min_cost_usd"], r["min_cost_usd"]) if v is not None]
            m["min_cost_usd"] = min(mins) if mins else None
    return sorted(merged.values(), key=lambda g: tuple((v is not None, v or "") for v in
                                                      (g[k] for k in GROUP_KEYS)))


def ledger_total(db: PlatformDB, day: date) -> Decimal:
    """The day's spend straight from the ledger: the reference the report must reconcile with."""
    start, end = focus.day_bounds(day)
    with db.engine.connect() as c:
        return ba.spend_between(c, start, end)


def budget_vs_actual(db: PlatformDB, day: date, groups: Iterable[Mapping[str, Any]],
                     daily_budget_usd: float) -> list[dict[str, Any]]:
    """The day against the daily budget, and each intent's spend to date (end of day) against its budget."""
    day_spend: dict[str | None, Decimal] = defaultdict(Decimal)
    for g in groups:
        day_spend[g["intent"]] += focus.dec(g["cost_usd"])
    total = sum(day_spend.values(), Decimal(0))
    _, end = focus.day_bounds(day)
    with db.engine.connect() as c:
        budgets = ba.intent_budgets(c)
        to_date = ba.intent_spend(c, budgets, until=end)
    rows = [_budget_row(ba.daily_scope(day), total, total, focus.dec(daily_budget_usd))]
    for name in sorted({n for n in day_spend if n is not None} | set(budgets)):
        rows.append(_budget_row(ba.intent_scope(name), day_spend.get(name, Decimal(0)), to_date.get(name),
                                budgets.get(name)))
    return rows


def _budget_row(scope: str, day_spend: Decimal, spend: Decimal | None, budget: Decimal | None) -> dict[str, Any]:
    """spend_usd is what the budget counts: the day for the daily scope, spend to date for an intent's budget."""
    percent = round(float(spend / budget * 100), 1) if budget and spend is not None else None
    return {"scope": scope, "day_spend_usd": float(day_spend),
            "spend_usd": float(spend) if spend is not None else None,
            "budget_usd": float(budget) if budget is not None else None, "percent": percent}


def aws_scope(environment: str | None) -> str:
    return f"aws:{environment}" if environment else "aws:(untagged)"


def aws_budget_vs_actual(groups: Iterable[Mapping[str, Any]], budgets: Mapping[str, Decimal]) -> list[dict[str, Any]]:
    """The day's AWS spend per environment tag against its daily budget; untagged spend has no budget."""
    spend: dict[str | None, Decimal] = defaultdict(Decimal)
    for g in groups:
        spend[g["environment"]] += focus.dec(g["cost"])
    rows = [_budget_row(aws_scope(env), spend.get(env, Decimal(0)), spend.get(env, Decimal(0)), budgets.get(env))
            for env in sorted({e for e in spend if e is not None} | set(budgets))]
    if None in spend:
        rows.append(_budget_row(aws_scope(None), spend[None], spend[None], None))
    return rows


def aws_breakdown(groups: Iterable[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """AWS spend per service or per environment, biggest first."""
    acc: dict[str, Decimal] = defaultdict(Decimal)
    for g in groups:
        acc[g[key] if g[key] is not None else "(untagged)"] += focus.dec(g["cost"])
    return [{key: k, "cost_usd": v} for k, v in sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))]


# -- report ------------------------------------------------------------------------------------------------
def price_map() -> tuple[dict[str, dict[str, float]], str]:
    from codemind_dagster.resources.llm.prices import load_prices

    table = load_prices()
    return ({key: {"input": p.input, "cache_write": p.cache_write, "cache_read": p.cache_read, "output": p.output}
             for key, p in table.models.items()}, table.version)


def report_rows(groups: Iterable[Mapping[str, Any]], day: date, *, billing_account_id: str = "codemind",
                billing_account_name: str = "CodeMind") -> list[dict[str, Any]]:
    prices, version = price_map()
    return focus.focus_rows(groups, day=day, prices=prices, price_version=version,
                            billing_account_id=billing_account_id, billing_account_name=billing_account_name)


def write_csv_atomic(path: Path, columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are for everyone who reads $CODEMIND_HOME
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_focus_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def breakdown(groups: Iterable[Mapping[str, Any]], key: str) -> list[dict[str, Any]]:
    """Spend and tokens per value of one dimension, biggest spend first (sums of the SQL aggregates)."""
    acc: dict[str, dict[str, Any]] = {}
    for g in groups:
        name = g[key] if g[key] is not None else "(none)"
        a = acc.setdefault(name, {key: name, "calls": 0, "tokens": 0, "cost_usd": Decimal(0)})
        a["calls"] += g["calls"]
        a["tokens"] += sum(g[c] for c in focus.TOKEN_COLUMNS)
        a["cost_usd"] += focus.dec(g["cost_usd"])
    return sorted(acc.values(), key=lambda a: (-a["cost_usd"], str(a[key])))


def md_table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "none"
    def cell(column: str, v: Any) -> str:
        if isinstance(v, Decimal | float):
            # Money keeps sub-cent precision; a percentage of budget reads better as 80.0 than 80.000000.
            return f"{float(v):.1f}" if column == "percent" else f"{float(v):.6f}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- Great Expectations -------------------------------------------------------------------------------------
def gx_validate(records: list[Mapping[str, Any]], columns: Mapping[str, str],
                expectations: Callable[[Any], list[Any]]) -> list[tuple[bool, dict[str, Any]]]:
    """Validate a small frame with GX 1.x in an ephemeral context; returns (success, result) per expectation.

    `columns` maps column name to pandas dtype so an empty day still has a typed frame; `expectations`
    receives the imported `great_expectations` module, which is imported only here (it takes seconds).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    # tqdm bars would land in the run's captured logs for every metric.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=dtype) for c, dtype in columns.items()})
    batch = (ctx.data_sources.add_pandas("finops").add_dataframe_asset("frame")
             .add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": frame}))
    out = []
    for expectation in expectations(gx):
        res = batch.validate(expectation)
        out.append((bool(res.success), dict(res.result or {})))
    return out


def _gx_metadata(result: dict[str, Any]) -> dict[str, Any]:
    """GX's numbers stay numbers (the UI plots them) and its lists become JSON, not a Python repr in a text cell."""
    keep = ("observed_value", "element_count", "unexpected_count", "partial_unexpected_list")
    out: dict[str, Any] = {}
    for k, v in result.items():
        if k in keep:
            v = _plain(v)
            out[k] = dg.MetadataValue.json(v) if isinstance(v, list | dict) else "none" if v is None else v
    return out


def _plain(v: Any) -> Any:
    """Numpy scalars (from pandas) as Python values, NaN as text; JSON-safe all the way down."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return v if v is None or isinstance(v, bool | int | float | str) else str(v)


# -- assets ---------------------------------------------------------------------------------------------------
def _day(context: dg.AssetExecutionContext) -> date:
    return date.fromisoformat(context.partition_key)


USAGE_CHECKS = {
    "no_negative_costs": "No ledger row of the day has a negative cost (GX on the per-group minimum cost).",
    "no_null_costs": "Every ledger row of the day has a cost (GX on the per-group count of null costs).",
}
REPORT_CHECKS = {
    "one_currency": "The FOCUS export bills in exactly one currency, USD (GX on BillingCurrency).",
    "totals_reconcile_with_ledger": "BilledCost of the FOCUS export's LLM rows sums to the ledger's own "
                                    "SUM(cost_usd) for the day, within $0.000001 (GX on BilledCost); AWS rows, "
                                    "when enabled, sum exactly to what Cost Explorer returned.",
}


@dg.asset(
    partitions_def=daily_partitions, group_name=GROUP, owners=OWNERS, kinds={"sql"},
    check_specs=[dg.AssetCheckSpec(n, asset="llm_usage", blocking=True, description=d)
                 for n, d in USAGE_CHECKS.items()],
    description="The day's LLM ledger (UTC) grouped by intent, task, provider, model and price version "
                "in SQL: calls, cache hits, errors, tokens per kind, cost.",
)
def llm_usage(context: dg.AssetExecutionContext, database: DatabaseResource):
    day = _day(context)
    groups = aggregate_day(database.client(), day)
    total = sum((g["cost_usd"] for g in groups), Decimal(0))
    yield dg.Output(groups, metadata={
        "ledger_rows": sum(g["calls"] for g in groups),
        "groups": len(groups),
        "cost_usd": float(total),
        "tokens": sum(g[c] for g in groups for c in focus.TOKEN_COLUMNS),
        "cache_hits": sum(g["cache_hits"] for g in groups),
        "errors": sum(g["errors"] for g in groups),
    })
    records = [{"min_cost_usd": None if g["min_cost_usd"] is None else float(g["min_cost_usd"]),
                "null_costs": g["null_costs"]} for g in groups]
    results = gx_validate(records, {"min_cost_usd": "float64", "null_costs": "int64"}, lambda gx: [
        gx.expectations.ExpectColumnValuesToBeBetween(column="min_cost_usd", min_value=0),
        gx.expectations.ExpectColumnValuesToBeBetween(column="null_costs", min_value=0, max_value=0),
    ])
    for (name, _), (passed, result), bad in zip(USAGE_CHECKS.items(), results, (
            [g for g in groups if g["min_cost_usd"] is not None and g["min_cost_usd"] < 0],
            [g for g in groups if g["null_costs"]]), strict=True):
        where = "; ".join(f"{g['intent'] or '-'}/{g['task']}/{g['provider']}/{g['model']}: "
                          f"min cost {focus.fmt(g['min_cost_usd'])}, {g['null_costs']} null" for g in bad[:20])
        yield dg.AssetCheckResult(check_name=name, passed=passed, metadata={
            **_gx_metadata(result), "offending_groups": where or "none"})


@dg.asset(
    partitions_def=daily_partitions, group_name=GROUP, owners=OWNERS, kinds={"csv"},
    check_specs=[dg.AssetCheckSpec(n, asset="cost_report", blocking=True, description=d)
                 for n, d in REPORT_CHECKS.items()],
    description="FinOps FOCUS 1.2 export of the day's LLM spend, one row per token SKU, and (when enabled) AWS "
                "spend from Cost Explorer per service and environment tag, at "
                "`$CODEMIND_HOME/reports/focus/<date>.csv`; spend and tokens by intent, task, provider and model; "
                "budget vs actual per intent, for the day and per AWS environment.",
)
def cost_report(context: dg.AssetExecutionContext, llm_usage: list[dict[str, Any]], database: DatabaseResource,
                reports: ReportsResource, llm: ModelRouterResource, aws_cost: AwsCostResource):
    day = _day(context)
    db = database.client()
    # Budgets are read before Cost Explorer is asked: a bad setting fails without a (billed) API call.
    aws_budgets = aws_cost.budgets() if aws_cost.enabled else {}
    aws_groups = aws_cost.day_costs(day) if aws_cost.enabled else []
    account = {"billing_account_id": reports.billing_account_id,
               "billing_account_name": reports.billing_account_name}
    rows = report_rows(llm_usage, day, **account)
    if aws_cost.enabled:
        rows += focus.aws_rows(aws_groups, day=day, tag_key=aws_cost.tag_key, **account)
    path = reports.focus_path(day)
    write_csv_atomic(path, focus.CLOUD_COLUMNS if aws_cost.enabled else focus.COLUMNS, rows)
    billed = focus.total_billed(rows)
    budgets = budget_vs_actual(db, day, llm_usage, llm.daily_budget_usd)
    aws_total = sum((g["cost"] for g in aws_groups), Decimal(0))
    aws_meta: dict[str, Any] = {}
    if aws_cost.enabled:
        aws_budget_rows = aws_budget_vs_actual(aws_groups, aws_budgets)
        budgets += aws_budget_rows
        over = [b["scope"] for b in aws_budget_rows if b["percent"] is not None and b["percent"] >= 100]
        aws_meta = {
            "llm_cost_usd": float(billed - aws_total),
            "aws_cost_usd": float(aws_total),
            # Cost Explorer revises recent days; an estimated day is worth re-materializing later.
            "aws_estimated": any(g["estimated"] for g in aws_groups),
            "aws_over_budget": ", ".join(over) or "none",
            "aws_by_service": dg.MetadataValue.md(md_table(aws_breakdown(aws_groups, "service"),
                                                           ["service", "cost_usd"])),
            "aws_by_environment": dg.MetadataValue.md(md_table(aws_breakdown(aws_groups, "environment"),
                                                               ["environment", "cost_usd"])),
        }
    summary = {"day": day.isoformat(), "path": str(path), "billed_cost_usd": float(billed),
               "focus_rows": len(rows), "budgets": budgets}
    if aws_cost.enabled:
        summary["aws_cost_usd"] = float(aws_total)
    # "path" is overwritten by the IO manager with where it stored the output: the CSV gets a key of its own.
    yield dg.Output(summary, metadata={
        "report_path": dg.MetadataValue.path(str(path)),
        "billed_cost_usd": float(billed),
        "focus_rows": len(rows),
        "ledger_rows": sum(g["calls"] for g in llm_usage),
        "tokens": sum(g[c] for g in llm_usage for c in focus.TOKEN_COLUMNS),
        **{f"by_{k}": dg.MetadataValue.md(md_table(breakdown(llm_usage, k), [k, "calls", "tokens", "cost_usd"]))
           for k in ("intent", "task", "provider", "model")},
        "budget_vs_actual": dg.MetadataValue.md(md_table(
            budgets, ["scope", "day_spend_usd", "spend_usd", "budget_usd", "percent"])),
        **aws_meta,
    })
    # The checks read the file as written and the ledger afresh, so neither trusts the code above.
    written = read_focus_csv(path)
    reference = float(ledger_total(db, day))
    llm_written = [r for r in written if not focus.is_aws_row(r)]
    # AWS rows count 0 towards the ledger sum: they reconcile with Cost Explorer below, not with the ledger.
    records = [{"BillingCurrency": r["BillingCurrency"],
                "LedgerBilledCost": 0.0 if focus.is_aws_row(r) else float(r["BilledCost"] or "nan")}
               for r in written]
    results = gx_validate(records, {"BillingCurrency": "object", "LedgerBilledCost": "float64"}, lambda gx: [
        gx.expectations.ExpectColumnUniqueValueCountToBeBetween(column="BillingCurrency", min_value=0, max_value=1),
        gx.expectations.ExpectColumnValuesToBeInSet(column="BillingCurrency", value_set=[focus.CURRENCY]),
        gx.expectations.ExpectColumnSumToBeBetween(column="LedgerBilledCost", min_value=reference - TOLERANCE_USD,
                                                   max_value=reference + TOLERANCE_USD),
    ])
    (one, r1), (usd, _), (llm_ok, r3) = results
    aws_check: dict[str, Any] = {}
    aws_ok = True
    if aws_cost.enabled:
        aws_written = sum((Decimal(r["BilledCost"] or 0) for r in written if focus.is_aws_row(r)), Decimal(0))
        aws_ok = aws_written == aws_total
        aws_check = {"aws_report_usd": float(aws_written), "aws_cost_explorer_usd": float(aws_total)}
    yield dg.AssetCheckResult(check_name="one_currency", passed=one and usd, metadata={
        "currencies": ", ".join(sorted({r["BillingCurrency"] for r in written})) or "none", **_gx_metadata(r1)})
    yield dg.AssetCheckResult(check_name="totals_reconcile_with_ledger", passed=llm_ok and aws_ok, metadata={
        "report_usd": float(sum((Decimal(r["BilledCost"] or 0) for r in llm_written), Decimal(0))),
        "ledger_usd": reference, **_gx_metadata(r3), **aws_check})


@dg.asset(
    partitions_def=daily_partitions, group_name=GROUP, owners=OWNERS, kinds={"csv"},
    description="Budget vs actual for the day, per intent and (when enabled) per AWS environment, the budget "
                "alerts raised that day, and the scopes whose LLM calls are refused now (at 100% of budget).",
)
def budget_status(context: dg.AssetExecutionContext, cost_report: dict[str, Any], database: DatabaseResource,
                  reports: ReportsResource, llm: ModelRouterResource) -> dg.MaterializeResult:
    day = _day(context)
    db = database.client()
    start, end = focus.day_bounds(day)
    al = t.budget_alerts.c
    with db.engine.connect() as c:
        alerts = [dict(r._mapping) for r in c.execute(
            sa.select(al.scope, al.threshold_percent, al.spend_usd, al.budget_usd, al.at)
            .where(al.at >= start, al.at < end).order_by(al.at))]
    blocks = sorted(ba.active_blocks(db, daily_budget_usd=llm.daily_budget_usd))
    budgets = cost_report["budgets"]
    write_csv_atomic(reports.budget_path(day), ["scope", "day_spend_usd", "spend_usd", "budget_usd", "percent"],
                     budgets)
    over = [b["scope"] for b in budgets if b["percent"] is not None and b["percent"] >= 100]
    return dg.MaterializeResult(metadata={
        "report_path": dg.MetadataValue.path(str(reports.budget_path(day))),
        "daily_spend_usd": budgets[0]["spend_usd"],
        "daily_budget_usd": budgets[0]["budget_usd"],
        "scopes_over_budget": ", ".join(over) or "none",
        "blocked_now": ", ".join(blocks) or "none",
        "budget_vs_actual": dg.MetadataValue.md(md_table(
            budgets, ["scope", "day_spend_usd", "spend_usd", "budget_usd", "percent"])),
        "alerts": dg.MetadataValue.md(md_table(alerts, ["at", "scope", "threshold_percent", "spend_usd",
                                                        "budget_usd"])),
    })


finops_assets = [llm_usage, cost_report, budget_status]

# Reports are short SQL reads: a subprocess per step would cost more than the step.
cost_report_job = dg.define_asset_job(
    "cost_report_job",
    selection=dg.AssetSelection.assets(*finops_assets),
    partitions_def=daily_partitions,
    executor_def=dg.in_process_executor,
    description="One UTC day of LLM spend: ledger summary, FOCUS cost report and budget status, GX-checked.",
)


def last_complete_day(today: date | None = None) -> date:
    """Daily partitions end yesterday (UTC): today is still being written."""
    return (today or ba.utc_day()) - timedelta(days=1)


defs = dg.Definitions(assets=finops_assets, jobs=[cost_report_job], sensors=[budget_sensor])
