"""FinOps: FOCUS rows, the SQL cost report, blocking GX checks, backfills and budget alerts."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from codemind_dagster.domain import focus
from codemind_dagster.resources import tables as t

REPO = Path(__file__).resolve().parent.parent
DAY = date(2026, 11, 3)
WEEK = [date(2026, 11, 1) + timedelta(days=i) for i in range(7)]
INTENTS = ["shop", "tickets", "sensors", None]
TASKS = ["intent_analysis", "planning", "coding", "test_writing", "repair"]
MODELS = [("anthropic", "claude-sonnet-4"), ("openai", "gpt-5"), ("bedrock", "anthropic.claude-haiku"),
          ("offline", "deterministic")]


def ledger_rows(day: date, n: int, seed: int = 7) -> list[dict]:
    """n ledger rows spread over one UTC day, costs with six decimals so sums are exact in Decimal."""
    rnd = random.Random(seed)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows = []
    for i in range(n):
        provider, model = MODELS[i % len(MODELS)]
        rows.append({
            "at": start + timedelta(microseconds=rnd.randrange(86_400_000_000)), "run_id": f"run-{i % 50}",
            "intent": INTENTS[i % len(INTENTS)], "task": TASKS[(i // 4) % len(TASKS)], "provider": provider,
            "model": model, "input_tokens": rnd.randrange(0, 5000), "cache_write_tokens": rnd.randrange(0, 500),
            "cache_read_tokens": rnd.randrange(0, 2000), "output_tokens": rnd.randrange(0, 3000),
            "reasoning_tokens": rnd.randrange(0, 800),
            "cost_usd": Decimal(rnd.randrange(0, 50_000)) / Decimal(1_000_000),
            "price_version": "2026-11-01" if i % 3 else "2026-10-01", "latency_ms": 12.5,
            "outcome": "ok" if i % 17 else "error", "cache_hit": i % 11 == 0,
        })
    return rows


def insert(db, rows: list[dict]) -> None:
    with db.tx() as c:
        for i in range(0, len(rows), 20_000):
            c.execute(t.llm_ledger.insert(), rows[i:i + 20_000])


def expected_groups(rows: list[dict]) -> dict[tuple, dict]:
    """The aggregation the SQL must reproduce, computed row by row in Python."""
    out: dict[tuple, dict] = defaultdict(lambda: defaultdict(Decimal))
    for r in rows:
        g = out[(r["intent"], r["task"], r["provider"], r["model"], r["price_version"])]
        g["calls"] += 1
        for c in (*focus.TOKEN_COLUMNS, "cost_usd"):
            g[c] += r[c]
    return out


def resources(settings):
    from codemind_dagster.commands.finops import finops_resources

    return finops_resources(settings)


def platform_db(settings):
    return resources(settings)["database"].client()


def materialize(settings, day: date, **kw):
    import dagster as dg

    from codemind_dagster.assets.finops import finops_assets

    return dg.materialize(finops_assets, partition_key=day.isoformat(), resources=resources(settings),
                          raise_on_error=False, **kw)


def materialized(result, asset: str) -> bool:
    return any(e.asset_key.to_user_string() == asset for e in result.get_asset_materialization_events())


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- FOCUS mapping --------------------------------------------------------------------------------------------
def test_focus_rows_have_every_mandatory_column_and_one_row_per_token_sku():
    agg = {"intent": "shop", "task": "coding", "provider": "anthropic", "model": "claude-sonnet-4",
           "price_version": "v1", "input_tokens": 1_000_000, "cache_write_tokens": 200_000,
           "cache_read_tokens": 500_000, "output_tokens": 100_000, "reasoning_tokens": 50_000,
           "cost_usd": Decimal("5.2")}
    prices = {"anthropic/claude-sonnet-4": {"input": 3.0, "cache_write": 3.75, "cache_read": 0.3, "output": 15.0}}
    rows = focus.focus_rows([agg], day=DAY, prices=prices, price_version="v1")

    assert [r["x_TokenType"] for r in rows] == ["input", "cache_write", "cache_read", "output", "reasoning"]
    required = {"BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
                "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd", "ChargeCategory",
                "ChargeClass", "ChargeDescription", "PricingQuantity", "PricingUnit", "ProviderName",
                "PublisherName", "InvoiceIssuerName", "ServiceName", "ServiceCategory", "BillingAccountId",
                "BillingAccountName"}
    assert required <= set(focus.MANDATORY_COLUMNS)
    for r in rows:
        assert set(r) == set(focus.COLUMNS)
        assert all(r[c] is not None for c in focus.MANDATORY_COLUMNS if c != "ChargeClass")
        assert r["ChargeClass"] is None  # regular charge, not a correction
        assert r["ChargeCategory"] == "Usage" and r["BillingCurrency"] == "USD"
        assert r["ServiceCategory"] == "AI and Machine Learning" and r["PricingUnit"] == "1000000 Tokens"
        assert r["ChargePeriodStart"] == "2026-11-03T00:00:00Z" and r["ChargePeriodEnd"] == "2026-11-04T00:00:00Z"
        assert r["BillingPeriodStart"] == "2026-11-01T00:00:00Z" and r["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
        assert (r["x_Intent"], r["x_Task"], r["x_Model"], r["x_PriceVersion"]) == ("shop", "coding",
                                                                                 "claude-sonnet-4", "v1")
        assert all(c in r for c in focus.CUSTOM_COLUMNS) and all(c.startswith("x_") for c in focus.CUSTOM_COLUMNS)
    # List costs follow the price table; the billed cost is the ledger's, split in the same proportions.
    assert [r["ListCost"] for r in rows] == ["3", "0.75", "0.15", "1.5", "0.75"]
    assert [r["ListUnitPrice"] for r in rows] == ["3", "3.75", "0.3", "15", "15"]
    assert rows[0]["PricingQuantity"] == "1" and rows[0]["ConsumedQuantity"] == "1000000"
    assert focus.total_billed(rows) == Decimal("5.2")
    assert rows[3]["PublisherName"] == "Anthropic" and rows[3]["ServiceName"] == "Claude API"


def test_focus_rows_reconcile_exactly_without_a_price_and_skip_empty_groups():
    base = {"intent": None, "task": "planning", "provider": "bedrock", "model": "anthropic.claude-haiku",
            "price_version": "old", "cache_write_tokens": 0, "cache_read_tokens": 0, "reasoning_tokens": 0}
    rows = focus.focus_rows([
        {**base, "input_tokens": 3, "output_tokens": 7, "cost_usd": Decimal("0.0000000001")},
        {**base, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0)},          # cache hits: nothing
        {**base, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal("0.25")},     # cost, no tokens
    ], day=DAY)
    assert [r["x_TokenType"] for r in rows] == ["input", "output", "input"]
    assert focus.total_billed(rows) == Decimal("0.2500000001")
    assert all(r["ListUnitPrice"] is None and r["ListCost"] == r["BilledCost"] for r in rows)
    assert rows[0]["ProviderName"] == "Amazon Web Services" and rows[0]["PublisherName"] == "Anthropic"
    assert rows[0]["x_Intent"] is None


# -- the SQL aggregation, on SQLite and PostgreSQL ------------------------------------------------------------
def test_aggregation_over_100k_rows_equals_an_independent_computation(db):
    from codemind_dagster.assets.finops import aggregate_day, ledger_total, report_rows

    rows = ledger_rows(DAY, 100_000)
    # Rows on the neighbouring days (and exactly at midnight) must not leak into the day.
    edges = ledger_rows(DAY + timedelta(days=1), 300, seed=1) + ledger_rows(DAY - timedelta(days=1), 300, seed=2)
    edges[0]["at"] = datetime(2026, 11, 4, tzinfo=UTC)
    insert(db, rows + edges)

    groups = aggregate_day(db, DAY)
    want = expected_groups(rows)
    assert len(groups) == len(want)
    for g in groups:
        e = want[tuple(g[k] for k in ("intent", "task", "provider", "model", "price_version"))]
        assert g["calls"] == e["calls"]
        for c in focus.TOKEN_COLUMNS:
            assert g[c] == e[c], c
        assert abs(g["cost_usd"] - e["cost_usd"]) < Decimal("1e-6")
        assert g["min_cost_usd"] >= 0 and g["null_costs"] == 0
    total = sum(r["cost_usd"] for r in rows)
    assert abs(ledger_total(db, DAY) - total) < Decimal("1e-6")
    report = report_rows(groups, DAY)
    assert abs(focus.total_billed(report) - total) < Decimal("1e-6")
    tokens = defaultdict(int)
    for r in report:
        tokens[r["x_TokenType"]] += int(r["ConsumedQuantity"])
    assert tokens == {s.kind: sum(r[s.column] for r in rows) for s in focus.TOKEN_SKUS}


def test_cost_report_over_100k_rows_writes_a_focus_file_that_matches_the_ledger(settings):
    db = platform_db(settings)
    rows = ledger_rows(DAY, 100_000)
    insert(db, rows + ledger_rows(DAY + timedelta(days=1), 100, seed=3))
    db.upsert_intent("shop", "h", {"spec": {"budget": {"llm_usd": 10.0}}}, "test")

    result = materialize(settings, DAY)
    assert result.success
    assert checks(result) == {"no_negative_costs": True, "no_null_costs": True, "one_currency": True,
                              "totals_reconcile_with_ledger": True}
    path = settings.reports_dir / "focus" / f"{DAY}.csv"
    report = read_csv(path)
    assert list(report[0]) == list(focus.COLUMNS)
    by_intent: dict[str, Decimal] = defaultdict(Decimal)
    for r in report:
        by_intent[r["x_Intent"]] += Decimal(r["BilledCost"])
    want: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        want[r["intent"] or ""] += r["cost_usd"]
    assert by_intent.keys() == want.keys()
    for k, v in want.items():
        assert abs(by_intent[k] - v) < Decimal("1e-6"), k
    assert {r["BillingCurrency"] for r in report} == {"USD"}

    meta = result.asset_materializations_for_node("cost_report")[0].metadata
    assert meta["ledger_rows"].value == 100_000
    assert abs(meta["billed_cost_usd"].value - float(sum(want.values()))) < 1e-6
    assert "| shop |" in meta["by_intent"].value and "| coding |" in meta["by_task"].value
    assert "intent:shop" in meta["budget_vs_actual"].value and f"daily:{DAY}" in meta["budget_vs_actual"].value
    budget = read_csv(settings.reports_dir / "budget" / f"{DAY}.csv")
    assert [b["scope"] for b in budget][:2] == [f"daily:{DAY}", "intent:sensors"]


def test_a_day_without_llm_calls_gets_an_empty_report_that_passes_its_checks(settings):
    result = materialize(settings, DAY)
    assert result.success and all(checks(result).values()) and len(checks(result)) == 4
    assert read_csv(settings.reports_dir / "focus" / f"{DAY}.csv") == []
    assert (settings.reports_dir / "focus" / f"{DAY}.csv").read_text().startswith("BilledCost,EffectiveCost,")


# -- blocking GX checks ---------------------------------------------------------------------------------------
def test_a_negative_cost_fails_the_gx_check_and_blocks_the_report(settings):
    db = platform_db(settings)
    bad = ledger_rows(DAY, 200)
    bad[42]["cost_usd"] = Decimal("-0.5")
    insert(db, bad)

    result = materialize(settings, DAY)
    assert not result.success
    assert checks(result) == {"no_negative_costs": False, "no_null_costs": True}
    ev = next(e for e in result.get_asset_check_evaluations() if e.check_name == "no_negative_costs")
    assert "-0.5" in ev.metadata["offending_groups"].value
    assert not materialized(result, "cost_report") and not materialized(result, "budget_status")
    assert not (settings.reports_dir / "focus" / f"{DAY}.csv").exists()


def test_a_null_cost_fails_the_gx_check(settings, monkeypatch):
    # cost_usd is NOT NULL in the schema, so the null is injected into the SQL summary.
    from codemind_dagster.assets import finops

    real = finops.aggregate_day

    def with_null(db, day):
        groups = real(db, day)
        groups[0]["null_costs"] = 3
        return groups

    insert(platform_db(settings), ledger_rows(DAY, 50))
    monkeypatch.setattr(finops, "aggregate_day", with_null)
    result = materialize(settings, DAY)
    assert checks(result) == {"no_negative_costs": True, "no_null_costs": False}
    assert not materialized(result, "cost_report")


def test_the_reconcile_check_catches_a_report_that_does_not_match_the_ledger(settings, monkeypatch):
    from codemind_dagster.assets import finops

    real = finops.report_rows
    monkeypatch.setattr(finops, "report_rows", lambda *a, **k: real(*a, **k)[1:])  # a row lost on the way
    insert(platform_db(settings), ledger_rows(DAY, 500))

    result = materialize(settings, DAY)
    assert not result.success
    assert checks(result)["totals_reconcile_with_ledger"] is False and checks(result)["one_currency"] is True
    ev = next(e for e in result.get_asset_check_evaluations() if e.check_name == "totals_reconcile_with_ledger")
    assert ev.metadata["report_usd"].value < ev.metadata["ledger_usd"].value
    assert materialized(result, "cost_report") and not materialized(result, "budget_status")


# -- backfills ------------------------------------------------------------------------------------------------
def test_backfill_cli_over_a_week_writes_seven_focus_files(settings):
    from click.testing import CliRunner

    from codemind_dagster.commands.finops import BACKFILL_TAG, backfill
    from codemind_dagster.instance import get_instance

    insert(platform_db(settings), [r for d in WEEK for r in ledger_rows(d, 300, seed=d.day)])
    result = CliRunner().invoke(backfill, ["cost-report", "--from", "2026-11-01", "--to", "2026-11-07"])
    assert result.exit_code == 0, result.output
    assert "7/7" in result.output and "backfilled 7 day(s)" in result.output
    assert sorted(p.name for p in (settings.reports_dir / "focus").iterdir()) == [f"{d}.csv" for d in WEEK]
    runs = get_instance(settings).get_runs()
    assert len(runs) == 7 and all(r.is_success and r.job_name == "cost_report_job" for r in runs)
    assert {r.tags["dagster/partition"] for r in runs} == {d.isoformat() for d in WEEK}
    assert len({r.tags[BACKFILL_TAG] for r in runs}) == 1


def test_backfill_cli_stops_at_the_first_failing_day_and_says_why(settings):
    from click.testing import CliRunner

    from codemind_dagster.commands.finops import backfill

    rows = [r for d in WEEK[:4] for r in ledger_rows(d, 50, seed=d.day)]
    next(r for r in rows if r["at"].date() == WEEK[2])["cost_usd"] = Decimal(-1)
    insert(platform_db(settings), rows)
    result = CliRunner().invoke(backfill, ["cost-report", "--from", "2026-11-01", "--to", "2026-11-04"])
    assert result.exit_code == 1
    assert "cost report for 2026-11-03 failed" in result.output
    assert "check no_negative_costs on llm_usage failed" in result.output
    assert "2 of 4 day(s) done" in result.output
    assert sorted(p.name for p in (settings.reports_dir / "focus").iterdir()) == ["2026-11-01.csv",
                                                                                  "2026-11-02.csv"]


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "2026-11-31", "--to", "2026-12-01"], "'2026-11-31' is not a date in the form YYYY-MM-DD"),
    (["--from", "2026-11-07", "--to", "2026-11-01"], "--from 2026-11-07 is after --to 2026-11-01"),
    (["--from", "2025-12-30", "--to", "2026-01-02"], "before the first cost-report partition, 2026-01-01"),
    (["--from", "2026-11-01", "--to", "2999-01-01"], "is not a complete day yet"),
])
def test_backfill_cli_rejects_bad_ranges_with_a_clear_error(args, message):
    from click.testing import CliRunner

    from codemind_dagster.commands.finops import backfill

    result = CliRunner().invoke(backfill, ["cost-report", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_dagster_job_backfill_registers_seven_partitions(settings, codemind_home):
    """`dagster job backfill` queues one run per day; the daemon (not running here) would launch them."""
    import dagster as dg

    from codemind_dagster.instance import dagster_yaml
    from codemind_dagster.settings import Settings

    home = codemind_home / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(dagster_yaml(Settings.from_env()))
    cmd = [str(Path(sys.executable).with_name("dagster")), "job", "backfill", "-m", "codemind_dagster.definitions", "-j", "cost_report_job", "--from", "2026-11-01",
           "--to", "2026-11-07", "--noprompt"]
    env = {**os.environ, "DAGSTER_HOME": str(home), "CODEMIND_HOME": str(codemind_home)}
    proc = subprocess.run(cmd, cwd=codemind_home, env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Launched backfill job" in proc.stdout

    with dg.DagsterInstance.from_config(str(home)) as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 1
        assert backfills[0].partition_names == [d.isoformat() for d in WEEK]
        assert backfills[0].job_name == "cost_report_job"
        runs = instance.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs) == [d.isoformat() for d in WEEK]
        assert all(r.tags["dagster/backfill"] == backfills[0].backfill_id for r in runs)
        assert all(r.status == dg.DagsterRunStatus.QUEUED for r in runs)


# -- budget sensor and blocks ----------------------------------------------------------------------------------
def spend(db, usd: str, intent: str | None = "shop", at: datetime | None = None) -> None:
    db.record_llm_call(run_id="r", intent=intent, task="coding", provider="anthropic", model="claude-sonnet-4",
                       input_tokens=10, output_tokens=10, cost_usd=Decimal(usd), price_version="v1",
                       latency_ms=1.0, outcome="ok", cache_hit=False)
    if at is not None:
        with db.tx() as c:
            last = c.execute(sa.select(sa.func.max(t.llm_ledger.c.id))).scalar()
            c.execute(t.llm_ledger.update().where(t.llm_ledger.c.id == last).values(at=at))


def tick(db, cursor: str | None = None, daily_budget: float = 2.0):
    import dagster as dg

    from codemind_dagster.resources.platform import DatabaseResource, ModelRouterResource
    from codemind_dagster.sensors.budget import budget_sensor

    database = DatabaseResource(url=db.url)
    llm = ModelRouterResource(database=database, daily_budget_usd=daily_budget, run_budget_usd=10.0)
    with dg.build_sensor_context(cursor=cursor, resources={"database": database, "llm": llm}) as ctx:
        return budget_sensor(ctx)


def alerts(db) -> set[tuple[str, int]]:
    with db.engine.connect() as c:
        return {(r.scope, r.threshold_percent) for r in c.execute(sa.select(t.budget_alerts))}


def test_budget_sensor_alerts_at_80_and_100_percent_once_each_and_blocks_at_100(db):
    from codemind_dagster.resources.budget_alerts import active_blocks, alerts_for_status

    now = datetime.now(UTC)
    today = f"daily:{now.date()}"
    db.upsert_intent("shop", "h1", {"spec": {"budget": {"llm_usd": 1.0}}}, "test")
    db.upsert_intent("free", "h2", {"spec": {}}, "test")
    spend(db, "0.5")
    spend(db, "5", intent="old", at=now - timedelta(days=2))  # yesterday's spend is not today's
    r = tick(db)
    assert alerts(db) == set() and not r.asset_events

    spend(db, "0.35")   # shop 0.85 of 1.00; today 0.85 of 2.00
    r = tick(db, r.cursor)
    assert alerts(db) == {("intent:shop", 80)}
    assert len(r.asset_events) == 1 and r.asset_events[0].metadata["scope"].value == "intent:shop"
    assert tick(db, r.cursor).skip_reason  # nothing new: the cursor short-circuits
    assert not tick(db).asset_events       # even without a cursor, an alert is recorded once
    assert active_blocks(db, now, daily_budget_usd=2.0) == set()

    spend(db, "0.15")   # shop 1.00 of 1.00
    spend(db, "0.7", intent="free")  # today 1.70 of 2.00
    r = tick(db, r.cursor)
    assert alerts(db) == {("intent:shop", 80), ("intent:shop", 100), (today, 80)}
    spend(db, "0.3", intent=None)  # today 2.00 of 2.00
    r = tick(db, r.cursor)
    assert alerts(db) == {("intent:shop", 80), ("intent:shop", 100), (today, 80), (today, 100)}
    assert active_blocks(db, now, daily_budget_usd=2.0) == {"intent:shop", today}
    status = {(a["scope"], a["threshold_percent"]): a for a in alerts_for_status(db, now, daily_budget_usd=2.0)}
    assert status[(today, 100)]["blocking"] and not status[(today, 80)]["blocking"]
    assert status[("intent:shop", 100)]["spend_usd"] == pytest.approx(1.0)

    # A new UTC day lifts the daily block; the intent's budget is a lifetime budget and stays spent.
    assert active_blocks(db, now + timedelta(days=1), daily_budget_usd=2.0) == {"intent:shop"}
    # Raising a budget lifts its block at once, before the sensor ticks again.
    assert active_blocks(db, now, daily_budget_usd=5.0) == {"intent:shop"}
    db.upsert_intent("shop", "h3", {"spec": {"budget": {"llm_usd": 4.0}}}, "test")
    assert active_blocks(db, now, daily_budget_usd=5.0) == set()
    # ... and re-arms its alerts: crossing the new budget alerts again.
    spend(db, "2.5")  # shop 3.50 of 4.00
    r = tick(db, r.cursor, daily_budget=10.0)
    assert [e.metadata["scope"].value for e in r.asset_events] == ["intent:shop"]
    with db.engine.connect() as c:
        row = c.execute(sa.select(t.budget_alerts).where(t.budget_alerts.c.scope == "intent:shop",
                                                         t.budget_alerts.c.threshold_percent == 80)).one()
    assert float(row.budget_usd) == 4.0
