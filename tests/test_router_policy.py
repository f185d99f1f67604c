"""Router policy: retries and backoff, failover, cooldowns, re-ask, budgets, response caches and the ledger."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from codemind_dagster.domain.task import Task
from codemind_dagster.resources.llm.cache import (
    CacheEntry,
    NoResponseCache,
    RedisResponseCache,
    SqlResponseCache,
)
from codemind_dagster.resources.llm.errors import (
    FatalError,
    OutputError,
    ProviderUnavailable,
    SpendLimitError,
    TransientError,
)
from codemind_dagster.resources.llm.prices import Price, PriceTable, load_prices
from codemind_dagster.resources.llm.providers import Call, Completion
from codemind_dagster.resources.llm.router import (
    DEFAULT_ROUTES,
    OFFLINE_ROUTES,
    BudgetExceeded,
    Candidate,
    Cooldowns,
    ModelRouter,
    RouterError,
    routes_for,
)
from codemind_dagster.resources.llm.usage import Usage

REDIS_URL = "redis://127.0.0.1:6379/0"


class Answer(BaseModel):
    text: str
    n: int


class Ask(BaseModel):
    text: str


TASK = Task(name="planning", version="answer/1", input=Ask, output=Answer, system="You answer.",
            context=lambda i: "<ctx/>", render=lambda i: i.text, offline=lambda i: Answer(text=i.text, n=0),
            max_tokens=1000, tier=1)
PRICES = PriceTable(version="test", models={
    "alpha/a1": Price(input=1.0, cache_write=1.25, cache_read=0.1, output=5.0),
    "beta/b1": Price(input=2.0, cache_write=2.0, cache_read=0.5, output=8.0),
    "gamma/g1": Price(input=3.0, cache_write=3.75, cache_read=0.3, output=15.0),
})
USAGE = Usage(input_tokens=100, output_tokens=50)
OK = {"text": "hi", "n": 1}


class Scripted:
    """A provider at the service boundary: each call plays the next step (an exception, a dict, a Completion)."""

    def __init__(self, name: str, steps: list[Any] | Callable[[Call], Any], *, available: bool = True):
        self.name, self.steps, self.calls, self._available = name, steps, [], available

    def available(self) -> tuple[bool, str]:
        return (True, "test") if self._available else (False, "TEST_KEY is not set")

    def complete(self, call: Call) -> Completion:
        self.calls.append(call)
        step = self.steps(call) if callable(self.steps) else self.steps[min(len(self.calls), len(self.steps)) - 1]
        if isinstance(step, BaseException):
            raise step
        return step if isinstance(step, Completion) else Completion(output=step, usage=USAGE)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(db, providers: dict[str, Scripted], *, routes=None, sleeps: list[float] | None = None,
                clock: Clock | None = None, **kw) -> ModelRouter:
    routes = routes or {"planning": [Candidate(p, {"alpha": "a1", "beta": "b1", "gamma": "g1"}[p], 1)
                                     for p in providers]}
    record = sleeps if sleeps is not None else []
    kw.setdefault("jitter", lambda: 0.0)
    kw.setdefault("cache", NoResponseCache())
    return ModelRouter(db=db, providers=providers, routes=routes, prices=PRICES, cooldowns=Cooldowns(),
                       sleep=record.append, clock=clock or Clock(), **kw)


def ask(text: str = "hello") -> Ask:
    return Ask(text=text)


def rows(db) -> list[tuple[str, str, str]]:
    return [(r.provider, r.outcome, bool(r.cache_hit)) for r in db.llm_calls()]


def ledger_total(db) -> Decimal:
    return sum((Decimal(str(r.cost_usd)) for r in db.llm_calls()), Decimal(0))


# -- routing table ------------------------------------------------------------------------------------
def test_routing_modes_and_every_routed_model_is_priced():
    assert routes_for(None) == OFFLINE_ROUTES and routes_for("offline") == OFFLINE_ROUTES
    assert routes_for("providers") == DEFAULT_ROUTES
    with pytest.raises(ValueError, match="unknown LLM routing mode 'cloud'"):
        routes_for("cloud")
    prices = load_prices()
    assert set(DEFAULT_ROUTES) == set(OFFLINE_ROUTES)
    for cands in DEFAULT_ROUTES.values():
        for c in cands:
            p = prices.price(c.provider, c.model)
            assert p.output > 0 and p.cache_read < p.input
            assert prices.sources[f"{c.provider}/{c.model}"]["date"]
            assert prices.sources[f"{c.provider}/{c.model}"]["source"].startswith("https://")


def test_cheapest_candidate_meeting_the_tier_goes_first(db):
    routes = {"planning": [Candidate("gamma", "g1", 3), Candidate("alpha", "a1", 1), Candidate("beta", "b1", 2)]}
    router = make_router(db, {}, routes=routes)
    assert [c.model for c in router.candidates(TASK)] == ["a1", "b1", "g1"]
    tier2 = Task(**{**TASK.__dict__, "tier": 2})
    assert [c.model for c in router.candidates(tier2)] == ["b1", "g1"]


def test_a_replaced_route_list_or_price_table_takes_effect_on_the_next_call(db):
    """The per-task plan is built once, and rebuilt when the routes or the prices it was built from change."""
    alpha, beta, gamma = Scripted("alpha", [OK]), Scripted("beta", [OK]), Scripted("gamma", [OK])
    router = make_router(db, {"alpha": alpha, "beta": beta, "gamma": gamma},
                         routes={"planning": [Candidate("alpha", "a1", 1), Candidate("beta", "b1", 1)]})
    router.run(TASK, ask("one"))
    router.routes["planning"] = [Candidate("beta", "b1", 1)]
    router.run(TASK, ask("two"))
    router.routes["planning"].append(Candidate("alpha", "a1", 1))
    router.run(TASK, ask("three"))
    router.routes["planning"][1] = Candidate("gamma", "g1", 1)  # edited in place: beta, gamma
    router.run(TASK, ask("three-b"))
    router.prices = PriceTable(version="test2", models={**PRICES.models, "alpha/a1": Price(9.0, 9.0, 9.0, 99.0)})
    router.run(TASK, ask("four"))
    calls = [(r.provider, r.price_version, float(r.cost_usd)) for r in db.llm_calls()]
    assert [c[:2] for c in calls] == [("alpha", "test"), ("beta", "test"), ("alpha", "test"), ("beta", "test"),
                                      ("beta", "test2")]
    assert calls[4][2] == pytest.approx(PRICES.models["beta/b1"].cost(USAGE))


def test_default_routes_put_the_cheapest_qualified_model_first(db):
    router = ModelRouter(db=db, routing="providers", providers={})
    from codemind_dagster.agents.coding import CODE_TASK
    from codemind_dagster.agents.planning import PLAN_TASK

    assert router.candidates(PLAN_TASK)[0] == Candidate("openai", "gpt-4.1-mini", 2)
    coding = router.candidates(CODE_TASK)
    assert coding[0] == Candidate("openai", "gpt-4.1", 3) and all(c.tier >= CODE_TASK.tier for c in coding)


def test_an_unpriced_model_is_a_routing_error_not_a_free_call(db):
    provider = Scripted("delta", [OK])
    router = make_router(db, {"delta": provider}, routes={"planning": [Candidate("delta", "d9", 1)]})
    with pytest.raises(RouterError, match=r"routes to delta/d9, which price table test does not price"):
        router.run(TASK, ask())
    assert provider.calls == [] and db.llm_calls() == []


# -- retries, backoff, failover ---------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    TransientError("alpha", "internal error", status=500),
    TransientError("alpha", "overloaded", status=529),
    TransientError("alpha", "request timed out"),
])
def test_transient_errors_are_retried_then_succeed(db, error):
    alpha = Scripted("alpha", [error, error, OK])
    sleeps: list[float] = []
    out = make_router(db, {"alpha": alpha}, sleeps=sleeps).run(TASK, ask())
    assert out == Answer(**OK) and len(alpha.calls) == 3
    assert sleeps == [0.5, 1.0]  # capped exponential, equal jitter at its floor
    assert rows(db) == [("alpha", "retry", False), ("alpha", "retry", False), ("alpha", "ok", False)]


def test_backoff_honours_retry_after_and_its_cap(db):
    sleeps: list[float] = []
    alpha = Scripted("alpha", [TransientError("alpha", "rate limited", status=429, retry_after_s=7.5),
                               TransientError("alpha", "rate limited", status=429, retry_after_s=0.1), OK])
    make_router(db, {"alpha": alpha}, sleeps=sleeps, jitter=lambda: 1.0).run(TASK, ask())
    assert sleeps == [7.5, 2.0]  # never less than Retry-After; otherwise the jittered exponential step
    assert all(s <= 60 for s in sleeps)

    # A Retry-After beyond the cap is not slept: the router fails over at once.
    sleeps.clear()
    alpha = Scripted("alpha", [TransientError("alpha", "rate limited", status=429, retry_after_s=3600)])
    beta = Scripted("beta", [OK])
    assert make_router(db, {"alpha": alpha, "beta": beta}, sleeps=sleeps).run(TASK, ask()) == Answer(**OK)
    assert sleeps == [] and len(alpha.calls) == 1 and len(beta.calls) == 1


def test_backoff_is_capped():
    router = ModelRouter.__new__(ModelRouter)
    router.backoff_base_s, router.backoff_max_s, router.retry_after_max_s = 1.0, 20.0, 60.0
    router.jitter = lambda: 1.0
    assert [router._backoff(n, None)[0] for n in range(1, 8)] == [1, 2, 4, 8, 16, 20, 20]
    assert router._backoff(9, 45.0) == (45.0, None)


def test_a_429_storm_fails_over_to_the_next_provider(db):
    storm = TransientError("alpha", "rate limited", status=429, retry_after_s=1)
    alpha, beta = Scripted("alpha", [storm]), Scripted("beta", [OK])
    sleeps: list[float] = []
    assert make_router(db, {"alpha": alpha, "beta": beta}, sleeps=sleeps).run(TASK, ask()) == Answer(**OK)
    assert len(alpha.calls) == 3 and len(beta.calls) == 1
    assert sleeps == [1.0, 1.0]  # no sleep after the last attempt: fail over at once
    assert rows(db) == [("alpha", "retry", False), ("alpha", "retry", False), ("alpha", "error", False),
                        ("beta", "ok", False)]


@pytest.mark.parametrize("error, words", [
    (FatalError("alpha", "invalid x-api-key", status=401),
     ["alpha/a1 rejected the request: alpha: invalid x-api-key (HTTP 401)"]),
    (SpendLimitError("alpha", "credit balance is too low", status=400),
     ["alpha/a1 refused the call for spend: alpha: credit balance is too low (HTTP 400)", "add credit"]),
])
def test_fatal_and_spend_limit_errors_are_not_retried_nor_failed_over(db, error, words):
    alpha, beta = Scripted("alpha", [error]), Scripted("beta", [OK])
    sleeps: list[float] = []
    with pytest.raises(RouterError) as exc:
        make_router(db, {"alpha": alpha, "beta": beta}, sleeps=sleeps).run(TASK, ask())
    msg = str(exc.value)
    assert "task 'planning'" in msg and "alpha/a1" in msg and "not retried" in msg
    assert all(w in msg for w in words)
    assert len(alpha.calls) == 1 and beta.calls == [] and sleeps == []
    assert rows(db) == [("alpha", "error", False)]


def test_unavailable_providers_are_skipped_and_named(db):
    alpha = Scripted("alpha", [OK], available=False)
    beta = Scripted("beta", [ProviderUnavailable("beta", "AZURE_OPENAI_ENDPOINT is not set")])
    with pytest.raises(RouterError) as exc:
        make_router(db, {"alpha": alpha, "beta": beta}).run(TASK, ask())
    assert "alpha/a1 skipped: unavailable (TEST_KEY is not set)" in str(exc.value)
    assert "beta/b1 skipped: unavailable (beta: AZURE_OPENAI_ENDPOINT is not set)" in str(exc.value)
    assert alpha.calls == []

    gamma = Scripted("gamma", [OK])
    assert make_router(db, {"alpha": alpha, "gamma": gamma}).run(TASK, ask()) == Answer(**OK)


def test_a_failing_candidate_cools_down_and_recovers(db):
    clock = Clock()
    alpha_steps: list[Any] = [TransientError("alpha", "overloaded", status=529)]
    alpha = Scripted("alpha", lambda call: alpha_steps[0])
    beta = Scripted("beta", [OK])
    router = make_router(db, {"alpha": alpha, "beta": beta}, clock=clock)

    router.run(TASK, ask("one"))
    assert len(alpha.calls) == 3 and len(beta.calls) == 1  # three transient failures: cooling down now

    clock.now += 30
    router.run(TASK, ask("two"))
    assert len(alpha.calls) == 3 and len(beta.calls) == 2  # skipped, not called

    clock.now += 31  # past the 60 s cooldown: one probe is allowed, and it works again
    alpha_steps[0] = OK
    router.run(TASK, ask("three"))
    assert len(alpha.calls) == 4 and len(beta.calls) == 2


def test_a_probe_that_fails_after_the_cooldown_sends_it_straight_back(db):
    clock = Clock()
    alpha = Scripted("alpha", [TransientError("alpha", "overloaded", status=529)])
    beta = Scripted("beta", [OK])
    router = make_router(db, {"alpha": alpha, "beta": beta}, clock=clock)
    router.run(TASK, ask("one"))
    clock.now += 61
    router.run(TASK, ask("two"))
    assert len(alpha.calls) == 4  # one probe, no further retries


def test_when_every_candidate_fails_the_error_shows_cooldowns_and_attempts(db):
    clock = Clock()
    alpha = Scripted("alpha", [TransientError("alpha", "overloaded", status=529)])
    beta = Scripted("beta", [TransientError("beta", "bad gateway", status=502)])
    router = make_router(db, {"alpha": alpha, "beta": beta}, clock=clock)
    with pytest.raises(RouterError) as first:
        router.run(TASK, ask())
    assert "alpha/a1: 3 attempt(s) failed" in str(first.value) and "HTTP 502" in str(first.value)
    with pytest.raises(RouterError) as second:
        router.run(TASK, ask())
    msg = str(second.value)
    assert "alpha/a1 skipped: cooling down for another 60s after 3 consecutive transient failures" in msg
    assert "beta/b1 skipped: cooling down" in msg
    assert len(alpha.calls) == 3 and len(beta.calls) == 3


def test_cooldowns_are_thread_safe():
    cd = Cooldowns()
    key = ("alpha", "a1")

    def hammer():
        for _ in range(1000):
            cd.failure(key, 0.0, 10**9, 60)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert cd.failures(key) == 8000


# -- structured output -------------------------------------------------------------------------------
def test_invalid_json_gets_one_re_ask_with_feedback(db):
    alpha = Scripted("alpha", [OutputError("expected JSON, got prose", raw="Sure! Here you go"), OK])
    assert make_router(db, {"alpha": alpha}).run(TASK, ask()) == Answer(**OK)
    assert alpha.calls[0].feedback is None
    assert "not valid JSON: expected JSON, got prose" in alpha.calls[1].feedback
    assert rows(db) == [("alpha", "invalid_output", False), ("alpha", "ok", False)]
    # The rejected answer was paid for: its tokens are estimated (the raw text), never taken as free.
    first = db.llm_calls()[0]
    assert first.output_tokens > 0 and float(first.cost_usd) > 0


def test_schema_violation_twice_is_a_clear_failure_with_both_attempts_on_the_ledger(db):
    alpha = Scripted("alpha", [{"text": "hi"}, {"text": "hi", "n": "many"}])
    beta = Scripted("beta", [OK])
    with pytest.raises(RouterError) as exc:
        make_router(db, {"alpha": alpha, "beta": beta}).run(TASK, ask())
    msg = str(exc.value)
    assert "task 'planning'" in msg and "invalid output twice" in msg and "n\n  Input should be a valid integer" in msg
    assert "Field required" in alpha.calls[1].feedback
    assert beta.calls == []
    calls = db.llm_calls()
    assert [c.outcome for c in calls] == ["invalid_output", "invalid_output"]
    assert all(float(c.cost_usd) == pytest.approx(PRICES.cost("alpha", "a1", USAGE)) for c in calls)


# -- ledger, costs, savings ----------------------------------------------------------------------------
def test_cache_savings_and_costs_come_from_the_price_table(db):
    usage = Usage(input_tokens=200, cache_write_tokens=1000, cache_read_tokens=4000, output_tokens=300,
                  reasoning_tokens=100)
    alpha = Scripted("alpha", [Completion(output=OK, usage=usage)])
    make_router(db, {"alpha": alpha}).run(TASK, ask())
    (row,) = db.llm_calls()
    assert (row.input_tokens, row.cache_write_tokens, row.cache_read_tokens, row.output_tokens,
            row.reasoning_tokens) == (200, 1000, 4000, 300, 100)
    expected = (200 * 1.0 + 1000 * 1.25 + 4000 * 0.1 + 400 * 5.0) / 1e6
    assert float(row.cost_usd) == pytest.approx(expected)
    assert float(row.cache_savings_usd) == pytest.approx(4000 * (1.0 - 0.1) / 1e6)
    assert row.price_version == "test"


def test_failed_attempts_that_consumed_tokens_are_charged_and_totals_add_up(db):
    spent = Usage(input_tokens=500, output_tokens=20)
    timeout = TransientError("alpha", "read timed out")
    timeout.usage = spent  # a provider that knows what a failed attempt consumed reports it
    alpha = Scripted("alpha", [timeout, {"bad": True}, OK])
    make_router(db, {"alpha": alpha}).run(TASK, ask(), intent="shop", run_id="run-1")
    calls = db.llm_calls()
    assert [c.outcome for c in calls] == ["retry", "invalid_output", "ok"]
    costs = [Decimal(str(c.cost_usd)) for c in calls]
    assert costs[0] == Decimal(str(round(PRICES.cost("alpha", "a1", spent), 8)))
    assert all(c > 0 for c in costs)
    assert ledger_total(db) == sum(costs)
    assert db.llm_spend(run_id="run-1") == pytest.approx(float(sum(costs)))
    assert db.llm_spend(intent="shop") == pytest.approx(float(sum(costs)))


# -- budgets -----------------------------------------------------------------------------------------
def test_a_budget_that_runs_out_mid_sequence_stops_before_the_call_that_would_exceed_it(db):
    alpha = Scripted("alpha", [Completion(output=OK, usage=Usage(input_tokens=2000, output_tokens=1000))])
    router = make_router(db, {"alpha": alpha}, run_budget_usd=0.03)
    per_call = PRICES.cost("alpha", "a1", Usage(input_tokens=2000, output_tokens=1000))  # $0.007
    made = 0
    with pytest.raises(BudgetExceeded) as exc:
        for i in range(10):
            router.run(TASK, ask(f"step {i}"), run_id="run-budget")
            made += 1
    e = exc.value
    assert e.budget == "run run-budg" and e.limit == 0.03
    assert e.spent == pytest.approx(made * per_call)
    assert e.spent + e.estimate > 0.03 and e.spent <= 0.03
    assert "run run-budg budget of $0.0300 would be exceeded" in str(e) and "could cost up to" in str(e)
    assert len(alpha.calls) == made  # the refused call was never made
    assert db.llm_spend(run_id="run-budget") <= 0.03
    assert rows(db)[-1] == ("alpha", "budget_blocked", False)


def test_budgets_are_rechecked_before_each_retry(db):
    """Spend grows while the router backs off (another run); the retry must not overshoot the budget."""
    alpha = Scripted("alpha", [TransientError("alpha", "overloaded", status=529), OK])
    router = make_router(db, {"alpha": alpha}, daily_budget_usd=1.0)

    def meanwhile_someone_spends(_s: float) -> None:
        db.record_llm_call(intent="other", run_id=None, task="coding", provider="alpha", model="a1",
                           price_version="test", outcome="ok", cache_hit=False, cost_usd=0.9999)

    router.sleep = meanwhile_someone_spends
    with pytest.raises(BudgetExceeded, match=r"daily budget of \$1.0000 would be exceeded: spent \$0.9999"):
        router.run(TASK, ask())
    assert len(alpha.calls) == 1


def test_the_re_ask_is_budget_checked_too(db):
    alpha = Scripted("alpha", [Completion(output={"text": "x"}, usage=Usage(input_tokens=10, output_tokens=500)), OK])
    router = make_router(db, {"alpha": alpha}, run_budget_usd=0.0055)  # one call's worst case fits, two don't
    with pytest.raises(BudgetExceeded):
        router.run(TASK, ask(), run_id="tight")
    assert len(alpha.calls) == 1
    assert [r[1] for r in rows(db)] == ["invalid_output", "budget_blocked"]


# -- response cache ------------------------------------------------------------------------------------
def _cache_hit_at_zero(db, cache) -> None:
    alpha = Scripted("alpha", [OK])
    router = make_router(db, {"alpha": alpha}, cache=cache)
    first = router.run(TASK, ask("cache me"), intent="shop")
    second = router.run(TASK, ask("cache me"), intent="shop")
    assert first == second and len(alpha.calls) == 1
    calls = db.llm_calls()
    assert rows(db) == [("alpha", "ok", False), ("alpha", "ok", True)]
    assert float(calls[0].cost_usd) > 0 and float(calls[1].cost_usd) == 0 and calls[1].input_tokens == 0
    # A different prompt, schema version or model is a miss.
    router.run(TASK, ask("something else"), intent="shop")
    router.run(Task(**{**TASK.__dict__, "version": "answer/2"}), ask("cache me"), intent="shop")
    assert len(alpha.calls) == 3


def test_cache_hit_is_free_on_sql(db):
    _cache_hit_at_zero(db, SqlResponseCache(db))


def test_cache_hit_is_free_on_redis(db):
    cache = RedisResponseCache(REDIS_URL, ttl_s=60, prefix=f"codemind-test:{uuid.uuid4().hex}:")
    try:
        _cache_hit_at_zero(db, cache)
        keys = list(cache.client.scan_iter(match=cache.prefix + "*"))
        assert len(keys) == 3 and all(0 < cache.client.ttl(k) <= 60 for k in keys)
    finally:
        cache.delete_all()
    assert list(cache.client.scan_iter(match=cache.prefix + "*")) == []


def test_a_cached_answer_of_a_fallback_candidate_is_used_before_calling_anyone(db):
    alpha = Scripted("alpha", [TransientError("alpha", "overloaded", status=529)])
    beta = Scripted("beta", [OK])
    router = make_router(db, {"alpha": alpha, "beta": beta}, cache=SqlResponseCache(db), cooldown_after=99)
    router.run(TASK, ask())
    router.run(TASK, ask())
    assert len(alpha.calls) == 3 and len(beta.calls) == 1
    assert rows(db)[-1] == ("beta", "ok", True)


def test_a_cache_outage_degrades_to_provider_calls(db):
    cache = RedisResponseCache("redis://127.0.0.1:1/0", ttl_s=60, prefix="codemind-test-nothing:")
    alpha = Scripted("alpha", [OK])
    assert make_router(db, {"alpha": alpha}, cache=cache).run(TASK, ask()) == Answer(**OK)
    assert rows(db) == [("alpha", "ok", False)]


def test_spend_totals_stay_exact_while_other_writers_add_rows(db):
    """The incremental (SQLite) budget read matches a full sum of the ledger after every change."""
    import sqlalchemy as sa

    from codemind_dagster.resources.llm.router import SpendTotals, _spend_query

    def add(intent, run_id, cost):
        db.record_llm_call(intent=intent, run_id=run_id, task="coding", provider="alpha", model="a1",
                           price_version="test", outcome="ok", cache_hit=False, cost_usd=cost)

    totals = SpendTotals(incremental=db.engine.dialect.name == "sqlite")
    kinds = ("intent", "daily", "run")
    from datetime import UTC, datetime

    params = {"intent": "shop", "run_id": "run-1",
              "day": datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)}
    steps = [("shop", "run-1", 0.5), ("other", "run-2", 0.25), ("shop", "run-3", 0.125), ("x", "run-1", 1.0)]
    for step in [None, *steps]:
        if step:
            add(*step)
        with db.engine.connect() as c:
            got = totals.read(c, kinds, params)
            full = tuple(float(v) for v in c.execute(_spend_query(kinds), params).one()[1:])
        assert got == pytest.approx(full)
    assert got == pytest.approx((0.625, 1.875, 1.5))
    # With cache keys, the same statement reads their stored responses (None for a miss).
    SqlResponseCache(db).put("key-hit", CacheEntry("coding", "alpha", "a1"), {"text": "cached", "n": 2})
    with db.engine.connect() as c:
        spent, stored = totals.read(c, kinds, params, ("key-miss", "key-hit"))
    assert spent == pytest.approx((0.625, 1.875, 1.5)) and stored == (None, {"text": "cached", "n": 2})
    # A ledger that goes back (a restored database) is read again from the start.
    with db.engine.begin() as c:
        c.execute(sa.text("DELETE FROM llm_ledger"))
    with db.engine.connect() as c:
        assert totals.read(c, kinds, params) == (0, 0, 0)


# -- the same policy through the real SDKs, against the local wire-format stand-in ----------------------
@pytest.fixture
def standin():
    from llm_standin import StandIn

    with StandIn() as s:
        yield s


def sdk_router(db, standin, *, timeout_s: float = 5.0, sleeps: list[float] | None = None, **kw) -> ModelRouter:
    from codemind_dagster.resources.llm.config import build_providers

    providers = build_providers(standin.config(CODEMIND_LLM_TIMEOUT_S=timeout_s))
    kw.setdefault("routes", {"planning": [Candidate("anthropic", "claude-haiku-4-5", 2),
                                          Candidate("openai", "gpt-4.1", 3)]})
    record = sleeps if sleeps is not None else []
    return ModelRouter(db=db, providers=providers, cooldowns=Cooldowns(), sleep=record.append,
                       jitter=lambda: 0.0, cache=NoResponseCache(), **kw)


@pytest.fixture
def plan_input(examples):
    from codemind_dagster.agents.planning import PlanInput
    from codemind_dagster.domain.intent import read_intent_file

    return PlanInput(intent=read_intent_file(examples / "loyalty-points.yaml").canonical())


def test_sdk_anthropic_429_storm_fails_over_to_openai(db, standin, plan_input):
    from codemind_dagster.agents.planning import PLAN_TASK

    for _ in range(3):
        standin.error(429, headers={"retry-after": "2"}, message="rate limited")
    sleeps: list[float] = []
    plan = sdk_router(db, standin, sleeps=sleeps).run(PLAN_TASK, plan_input, intent="loyalty-points", run_id="r")
    assert plan.intent == "loyalty-points"
    assert [r.family for r in standin.requests] == ["anthropic"] * 3 + ["openai"]
    assert sleeps == [2.0, 2.0]  # Retry-After honoured between attempts, none before failing over
    calls = db.llm_calls()
    assert [(c.provider, c.outcome) for c in calls] == [("anthropic", "retry"), ("anthropic", "retry"),
                                                       ("anthropic", "error"), ("openai", "ok")]
    assert "HTTP 429" in calls[0].error and float(calls[-1].cost_usd) > 0
    assert calls[-1].input_tokens > 0 and calls[-1].output_tokens > 0


@pytest.mark.parametrize("script", ["500", "529", "timeout"])
def test_sdk_transient_errors_are_retried(db, standin, plan_input, script):
    from codemind_dagster.agents.planning import PLAN_TASK

    if script == "timeout":
        standin.hang(3)
    else:
        standin.error(int(script), message="try again")
    router = sdk_router(db, standin, timeout_s=0.5)
    router.run(PLAN_TASK, plan_input)
    assert [r.family for r in standin.requests] == ["anthropic", "anthropic"]
    assert [c.outcome for c in db.llm_calls()] == ["retry", "ok"]


@pytest.mark.parametrize("status, kind, text", [
    (401, "authentication_error", "rejected the request: anthropic: authentication_error: invalid x-api-key (HTTP 401)"),
    (400, "billing_error", "refused the call for spend: anthropic: billing_error: Your credit balance is too low"),
])
def test_sdk_auth_and_spend_errors_stop_at_once(db, standin, plan_input, status, kind, text):
    from codemind_dagster.agents.planning import PLAN_TASK

    standin.error(status, type=kind, message="Your credit balance is too low" if status == 400 else "invalid x-api-key")
    with pytest.raises(RouterError, match=r"anthropic/claude-haiku-4-5") as exc:
        sdk_router(db, standin).run(PLAN_TASK, plan_input)
    assert text in str(exc.value) and "not retried" in str(exc.value)
    assert "sk-ant-standin-key" not in str(exc.value)
    assert len(standin.requests) == 1


def test_sdk_invalid_json_is_re_asked_once_with_feedback(db, standin, plan_input):
    from codemind_dagster.agents.planning import PLAN_TASK

    standin.malformed("Sure! Here is the plan: {not json")
    sdk_router(db, standin).run(PLAN_TASK, plan_input)
    assert len(standin.requests) == 2
    retry_text = json.dumps(standin.requests[1].json["messages"])
    assert "Your previous answer was rejected" in retry_text and "not valid JSON" in retry_text
    calls = db.llm_calls()
    assert [c.outcome for c in calls] == ["invalid_output", "ok"]
    assert float(calls[0].cost_usd) > 0  # the rejected answer consumed tokens and is charged


def test_sdk_prompt_cache_savings_land_in_the_ledger(db, standin, plan_input):
    from codemind_dagster.agents.planning import PLAN_TASK

    router = sdk_router(db, standin)
    router.run(PLAN_TASK, plan_input, run_id="a")
    router.run(PLAN_TASK, plan_input, run_id="b")  # response cache off: the prompt cache is read instead
    first, second = db.llm_calls()
    assert first.cache_write_tokens > 0 and first.cache_read_tokens == 0 and float(first.cache_savings_usd) == 0
    assert second.cache_read_tokens > 0
    price = load_prices().price("anthropic", "claude-haiku-4-5")
    assert float(second.cache_savings_usd) == pytest.approx(second.cache_read_tokens * (price.input - price.cache_read) / 1e6)
    assert float(second.cost_usd) < float(first.cost_usd)


def test_llm_check_lists_providers_routes_and_prices(monkeypatch, standin):
    from click.testing import CliRunner

    from codemind_dagster.commands.llm import llm

    for k in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in standin.env().items():
        if k.startswith(("ANTHROPIC_", "OPENAI_")):
            monkeypatch.setenv(k, v)
    out = CliRunner().invoke(llm, ["check", "--json", "--routing", "providers"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    usable = {p["name"]: p["usable"] for p in report["providers"]}
    assert usable["anthropic"] and usable["openai"] and not usable["azure"] and not usable["bedrock"]
    coding = report["routes"]["coding"]
    assert coding["tier"] == 3 and coding["candidates"][0]["model"] == "gpt-4.1"
    assert [c["usable"] for c in coding["candidates"]][:2] == [True, False]  # openai yes, azure not configured
    assert report["prices"]["version"] == load_prices().version
    text = CliRunner().invoke(llm, ["check"])
    assert text.exit_code == 0 and "routing mode: offline" in text.output and "offline/deterministic" in text.output


@pytest.mark.parametrize("value", [
    datetime(2026, 11, 26, tzinfo=UTC), datetime(999, 1, 2, 3, 4, 5, 6),  # noqa: DTZ001 - naive on purpose
    datetime(2026, 6, 1, 12, 0, 0, 999999, tzinfo=UTC),
    datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=5))), None])
def test_hot_path_statements_bind_datetimes_exactly_as_sqlalchemy(value):
    """The SQLite hot path formats datetimes itself; what it writes must be what SQLAlchemy would write."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import sqlite

    from codemind_dagster.resources import tables as t
    from codemind_dagster.resources.llm.cache import CompiledSql

    dialect = sqlite.dialect()
    q = CompiledSql(sa.select(t.llm_ledger.c.id).where(t.llm_ledger.c.at >= sa.bindparam("day")), dialect)
    assert q.args({"day": value}) == [t.llm_ledger.c.at.type._cached_bind_processor(dialect)(value)]


def test_cache_keys_are_stable_across_versions_and_exact(db):
    """A key is sha256 of the sorted JSON of the request, so entries written by earlier versions keep hitting."""
    import hashlib

    from codemind_dagster.resources.llm.router import _schema

    router = make_router(db, {"alpha": Scripted("alpha", [OK])})
    [route] = router._plan(TASK)
    prompt = "<ctx/>\nhello \udc80 \u00e9"
    blob = json.dumps({"provider": "alpha", "model": "a1", "task": "planning", "schema": "answer/1",
                       "schema_digest": _schema(Answer)[1], "max_tokens": 1000, "system": "You answer.",
                       "prompt": prompt}, sort_keys=True)
    assert route.key(prompt) == hashlib.sha256(blob.encode()).hexdigest()
    changed = [Task(**{**TASK.__dict__, field: value}) for field, value in
               (("system", "You answer briefly."), ("max_tokens", 999), ("version", "answer/2"))]
    keys = {route.key(prompt), route.key(prompt + " "), *(make_router(db, {"alpha": Scripted("alpha", [OK])})
                                                         ._plan(task)[0].key(prompt) for task in changed)}
    assert len(keys) == 5


def test_a_cache_hit_with_budgets_is_one_statement_and_free(db):
    """With budgets on, the lookup rides in the budget read; a hit costs nothing and moves no budget."""
    alpha = Scripted("alpha", [OK])
    router = make_router(db, {"alpha": alpha}, cache=SqlResponseCache(db), daily_budget_usd=5.0, run_budget_usd=1.0)
    first = router.run(TASK, ask("same"), intent="shop", run_id="run-1", intent_budget_usd=2.0)
    again = make_router(db, {"alpha": alpha}, cache=SqlResponseCache(db), daily_budget_usd=5.0,
                        run_budget_usd=1.0).run(TASK, ask("same"), intent="shop", run_id="run-2", intent_budget_usd=2.0)
    assert first == again == Answer(**OK) and len(alpha.calls) == 1
    assert rows(db) == [("alpha", "ok", False), ("alpha", "ok", True)]
    assert float(db.llm_calls()[1].cost_usd) == 0
