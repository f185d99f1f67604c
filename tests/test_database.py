"""The platform DB on SQLite and PostgreSQL: migrations, intents, promotions, ledger."""

from __future__ import annotations

import pytest


def test_migrations_reach_head_and_are_idempotent(db):
    assert db.schema_revision() == "0006"
    db.migrate()
    assert db.schema_revision() == "0006"


def test_upsert_intent_reports_new_unchanged_changed(db):
    assert db.upsert_intent("a", "h1", {"x": 1}, "/f.yaml") == "new"
    assert db.upsert_intent("a", "h1", {"x": 1}, "/f.yaml") == "unchanged"
    db.set_intent_error("a", "boom")
    assert db.upsert_intent("a", "h2", {"x": 2}, "/f.yaml") == "changed"
    row = db.intent_row("a")
    assert (row.spec_hash, row.spec, row.error) == ("h2", {"x": 2}, None)


def test_promotion_request_is_recorded_once_per_target(db):
    first = db.request_promotion("a", "dev", "art1")
    assert first is not None
    assert db.request_promotion("a", "dev", "art1") is None
    assert db.request_promotion("a", "staging", "art1") is not None
    assert db.retry_promotion(first) == 2
    assert [(p.environment, p.attempts) for p in db.promotions("a")] == [("dev", 2), ("staging", 1)]


def test_finishing_a_live_deployment_supersedes_the_previous_one(db):
    d1 = db.start_deployment("a", "dev", "art1", "run1")
    db.finish_deployment(d1, "live", url="http://x", pid=1)
    d2 = db.start_deployment("a", "dev", "art2", "run2")
    assert db.live_deployments("a")[("a", "dev")].artifact == "art1"
    db.finish_deployment(d2, "live", url="http://x", pid=2)
    assert db.live_deployments("a")[("a", "dev")].artifact == "art2"
    assert [d.status for d in db.deployment_history("a")] == ["superseded", "live"]


def test_stop_deployments_frees_targets_for_a_later_promotion(db):
    db.request_promotion("a", "dev", "art1")
    db.set_promotion("a", "dev", "art1", "done")
    dep = db.start_deployment("a", "dev", "art1", None)
    db.finish_deployment(dep, "live", url="http://x", pid=1)
    assert db.stop_deployments() == 1
    assert db.live_deployments() == {}
    assert db.promotions("a")[0].status == "stopped"
    assert db.resume_stopped() == 1 and db.promotions("a")[0].status == "resume"


def test_ledger_sums_spend_by_scope(db):
    base = dict(task="planning", provider="p", model="m", price_version="v", outcome="ok", cache_hit=False)
    db.record_llm_call(intent="a", run_id="r1", cost_usd=0.25, **base)
    db.record_llm_call(intent="a", run_id="r2", cost_usd=0.5, **base)
    db.record_llm_call(intent="b", run_id="r2", cost_usd=1.0, **base)
    assert db.llm_spend(intent="a") == pytest.approx(0.75)
    assert db.llm_spend(run_id="r2") == pytest.approx(1.5)
    assert db.llm_spend() == pytest.approx(1.75)


def test_response_cache_keeps_the_first_answer(db):
    db.cache_put("k", task="t", provider="p", model="m", response={"a": 1})
    db.cache_put("k", task="t", provider="p", model="m", response={"a": 2})
    assert db.cache_get("k") == {"a": 1}
    assert db.cache_get("other") is None


def test_graph_round_trip(db):
    db.replace_graph("a", [{"key": "A", "kind": "Entity", "properties": {"n": 1}}],
                     [{"src": "A", "dst": "A", "kind": "REFERENCES", "properties": {}}])
    db.replace_graph("a", [{"key": "B", "kind": "Entity", "properties": {}}], [])
    nodes, edges = db.graph("a")
    assert [n.key for n in nodes] == ["B"] and edges == []


def test_migrations_match_the_table_definitions(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from codemind_dagster.resources.tables import metadata

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], f"tables.py and the migrations differ; write a migration: {diff}"
