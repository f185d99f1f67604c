"""The model router with the offline provider: ledger, cache, budgets."""

from __future__ import annotations

import pytest

from codemind_dagster.agents.planning import PLAN_TASK, PlanInput
from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.resources.llm.prices import Price, PriceTable, load_prices
from codemind_dagster.resources.llm.router import BudgetExceeded, ModelRouter


@pytest.fixture
def plan_input(examples):
    return PlanInput(intent=read_intent_file(examples / "loyalty-points.yaml").canonical())


def test_every_call_lands_in_the_ledger_and_repeats_hit_the_cache(db, plan_input):
    router = ModelRouter(db=db)
    first = router.run(PLAN_TASK, plan_input, intent="loyalty-points", run_id="r1")
    second = router.run(PLAN_TASK, plan_input, intent="loyalty-points", run_id="r2")
    assert first == second
    calls = db.llm_calls(intent="loyalty-points")
    assert [(c.provider, c.model, c.task, c.cache_hit, c.outcome) for c in calls] == [
        ("offline", "deterministic", "planning", False, "ok"),
        ("offline", "deterministic", "planning", True, "ok"),
    ]
    assert calls[0].input_tokens > 0 and calls[0].output_tokens > 0
    assert calls[0].price_version == load_prices().version
    assert float(calls[1].cost_usd) == 0


def test_offline_plan_lists_rules_as_not_implemented(db, plan_input):
    plan = ModelRouter(db=db).run(PLAN_TASK, plan_input)
    rules = plan_input.intent["spec"]["rules"]
    assert rules and len(plan.rules_not_implemented) == len(rules)
    assert all("not implemented by the offline provider" in r for r in plan.rules_not_implemented)


def test_budget_is_checked_before_the_call(db, plan_input):
    priced = PriceTable(version="test", models={"offline/deterministic": Price(3, 3.75, 0.3, 15)})
    router = ModelRouter(db=db, prices=priced)
    with pytest.raises(BudgetExceeded) as exc:
        router.run(PLAN_TASK, plan_input, intent="loyalty-points", intent_budget_usd=0.01)
    assert "intent 'loyalty-points' budget of $0.0100 would be exceeded" in str(exc.value)
    # Nothing was called, so nothing is owed; the refusal itself is on the ledger at $0.
    assert [(c.outcome, float(c.cost_usd), c.input_tokens) for c in db.llm_calls()] == [("budget_blocked", 0, 0)]


def test_daily_budget_counts_earlier_spend(db, plan_input):
    priced = PriceTable(version="test", models={"offline/deterministic": Price(3, 3.75, 0.3, 15)})
    db.record_llm_call(intent="x", run_id=None, task="coding", provider="offline", model="deterministic",
                       price_version="test", outcome="ok", cache_hit=False, cost_usd=4.99)
    with pytest.raises(BudgetExceeded, match="daily budget of \\$5.0000"):
        ModelRouter(db=db, prices=priced, daily_budget_usd=5.0).run(PLAN_TASK, plan_input)


def test_a_spent_budget_fails_fast_but_free_calls_still_run(db, plan_input):
    db.record_llm_call(intent="x", run_id=None, task="coding", provider="offline", model="deterministic",
                       price_version="test", outcome="ok", cache_hit=False, cost_usd=5.0)
    priced = PriceTable(version="test", models={"offline/deterministic": Price(0, 0, 0, 1e-9)})
    with pytest.raises(BudgetExceeded, match="daily budget"):
        ModelRouter(db=db, prices=priced, daily_budget_usd=5.0).run(PLAN_TASK, plan_input)
    assert ModelRouter(db=db, daily_budget_usd=5.0).run(PLAN_TASK, plan_input, intent_budget_usd=0.0)
