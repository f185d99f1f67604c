"""The budget sensor: records an alert when LLM spend crosses 80% and 100% of the daily or an intent's budget."""

import hashlib
import json
from datetime import UTC, datetime

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.resources import budget_alerts as ba
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.platform import DatabaseResource, ModelRouterResource


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Compares today's LLM spend (UTC) with the daily budget and each intent's spend with its "
                       "spec.budget.llm_usd; records an alert once per scope at 80% and at 100%. At 100% the "
                       "router refuses new calls for that scope until the budget is raised or the day rolls over.")
def budget_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource,
                  llm: ModelRouterResource) -> dg.SensorResult:
    db = database.client()
    now = datetime.now(UTC)
    # Spend only changes with new ledger rows, budgets with the intents table or settings, the daily scope
    # with the date: when none of them moved since the last tick there is nothing to evaluate.
    with db.engine.connect() as c:
        last_id = c.execute(sa.select(sa.func.max(t.llm_ledger.c.id))).scalar() or 0
        budgets = {k: str(v) for k, v in ba.intent_budgets(c).items()}
    budgets_hash = hashlib.sha256(json.dumps([budgets, llm.daily_budget_usd], sort_keys=True).encode()).hexdigest()
    state = {"ledger_id": last_id, "day": ba.utc_day(now).isoformat(), "budgets": budgets_hash[:16]}
    cursor = json.dumps(state, sort_keys=True)
    if context.cursor == cursor:
        return dg.SensorResult(skip_reason="no new LLM calls and no budget change since the last tick",
                               cursor=cursor)
    states = ba.budget_states(db, now, daily_budget_usd=llm.daily_budget_usd)
    new = ba.record_alerts(db, states, now)
    events = []
    for a in new:
        verb = "calls for this scope are refused" if a["threshold_percent"] >= ba.BLOCK_THRESHOLD else "warning"
        context.log.warning(f"budget alert {a['scope']}: {a['percent']}% of ${a['budget_usd']:.4f} "
                            f"(spent ${a['spend_usd']:.4f}, threshold {a['threshold_percent']}%): {verb}")
        events.append(dg.AssetObservation(asset_key="budget_status", metadata={
            "scope": a["scope"], "threshold_percent": a["threshold_percent"], "spend_usd": a["spend_usd"],
            "budget_usd": a["budget_usd"], "percent": a["percent"]}))
    return dg.SensorResult(asset_events=events, cursor=cursor,
                           skip_reason=None if new else "no budget crossed a new threshold")
