"""DR readiness as a precondition of production: a stale drill holds the release, a fresh one frees it."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.domain.promotion import next_step
from codemind_dagster.resources.database import now
from codemind_dagster.resources.platform import PromotionPolicyResource
from codemind_dagster.resources.tables import dr_drills
from codemind_dagster.sensors.promotion import promotion_requests


def drill(db, age: timedelta, ok: bool = True) -> None:
    at = now() - age
    with db.tx() as c:
        c.execute(sa.insert(dr_drills).values(backup_id="b", started_at=at, finished_at=at, ok=ok, rpo_s=1.0,
                                              rto_s=1.0, checks=[]))


def test_rule_holds_only_production():
    kw = dict(artifact="a", environments=["dev", "staging", "production"], require_approval=[],
              checks_passed=True, approved=set(), failed={}, dr_hold="no drill")
    assert next_step(live={}, **kw).action == "deploy"
    d = next_step(live={"dev": "a", "staging": "a"}, **kw)
    assert (d.action, d.environment, d.reason) == ("await_dr", "production", "no drill")


def test_stale_drill_holds_production_and_a_fresh_one_releases_it(db, examples):
    intent = read_intent_file(examples / "inventory-catalog.yaml")
    db.upsert_intent(intent.name, intent.content_hash, intent.canonical(), "x.yaml")
    db.add_release(intent.name, "a" * 64, intent.content_hash, None)
    for env in ("dev", "staging"):
        db.request_promotion(intent.name, env, "a" * 64)
        db.set_promotion(intent.name, env, "a" * 64, "done")
        db.finish_deployment(db.start_deployment(intent.name, env, "a" * 64, None), "live", url="u", pid=1)
    policy = PromotionPolicyResource(dr_max_validation_age_s=3600)
    instance = dg.DagsterInstance.ephemeral()

    assert "none yet" in policy.dr_hold(db)
    assert promotion_requests(db, instance, policy.dr_hold(db)) == []
    drill(db, timedelta(hours=1), ok=True)
    drill(db, timedelta(minutes=1), ok=False)  # a failed drill does not count
    hold = policy.dr_hold(db)
    assert hold and "old (max 1:00:00)" in hold
    assert promotion_requests(db, instance, hold) == []
    drill(db, timedelta(minutes=5))
    assert policy.dr_hold(db) is None
    [req] = promotion_requests(db, instance, policy.dr_hold(db))
    assert (req.job_name, req.partition_key) == ("deploy_production", intent.name)
    assert PromotionPolicyResource().dr_hold(db) is None  # no setting, no gate
