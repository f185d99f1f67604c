"""The promotion sensor: moves each release dev -> staging -> production by the promotion rules."""


from dataclasses import dataclass
from datetime import timedelta

import dagster as dg

from codemind_dagster.assets.deployments import ARTIFACT_TAG
from codemind_dagster.domain.intent import Intent
from codemind_dagster.domain.promotion import Decision, next_step
from codemind_dagster.jobs import deploy_jobs
from codemind_dagster.resources.database import PlatformDB, as_utc, now
from codemind_dagster.resources.platform import DatabaseResource, PromotionPolicyResource

MAX_ATTEMPTS = 3
# A request no run has picked up for this long is taken as lost (e.g. the requester crashed).
STALE_REQUEST = timedelta(minutes=10)


@dataclass(frozen=True)
class ReleaseState:
    intent: str
    artifact: str
    decision: Decision


def release_states(db: PlatformDB, dr_hold: str | None = None) -> list[ReleaseState]:
    """The promotion decision for the latest release of every intent."""
    approvals = db.approvals()
    live_all = db.live_deployments()
    out = []
    for row in db.intent_rows():
        release = db.latest_release(row.name)
        if release is None:
            continue
        intent = Intent.model_validate(row.spec)
        a = release.artifact
        failed = {p.environment: p.detail or "failed" for p in db.promotions(row.name)
                  if p.artifact == a and p.status == "failed"}
        decision = next_step(
            artifact=a, environments=intent.spec.promotion.environments,
            require_approval=intent.spec.promotion.require_approval, checks_passed=True,
            live={env: r.artifact for (i, env), r in live_all.items() if i == row.name},
            approved={env for (i, env, art) in approvals if i == row.name and art == a}, failed=failed,
            dr_hold=dr_hold)
        out.append(ReleaseState(row.name, a, decision))
    return out


def promotion_requests(db: PlatformDB, instance: dg.DagsterInstance, dr_hold: str | None = None,
                       ) -> list[dg.RunRequest]:
    """Run requests for every release whose next step is a deploy; idempotent through the DB."""
    requests = []
    for state in release_states(db, dr_hold):
        d = state.decision
        if d.action != "deploy" or d.environment is None:
            continue
        env, a = d.environment, state.artifact
        existing = next((p for p in db.promotions(state.intent) if p.environment == env and p.artifact == a), None)
        if existing is None:
            db.request_promotion(state.intent, env, a)
            attempt = 1
        elif existing.status == "resume":
            attempt = db.retry_promotion(existing.id)
        elif existing.status in ("requested", "running") and _lost(existing, instance):
            if existing.attempts >= MAX_ATTEMPTS:
                db.set_promotion(state.intent, env, a, "failed",
                                 detail=f"gave up after {existing.attempts} attempts whose runs did not finish")
                continue
            attempt = db.retry_promotion(existing.id)
        else:
            continue
        requests.append(dg.RunRequest(
            job_name=deploy_jobs[env].name, partition_key=state.intent,
            run_key=f"promote:{state.intent}:{env}:{a[:16]}:{attempt}",
            tags={ARTIFACT_TAG: a, "codemind/environment": env, "codemind/attempt": str(attempt)}))
    return requests


def _lost(promo, instance: dg.DagsterInstance) -> bool:
    """A requested or running promotion whose run ended without recording an outcome."""
    if promo.run_id:
        run = instance.get_run_by_id(promo.run_id)
        return run is None or (run.is_finished and not run.is_success)
    return now() - as_utc(promo.updated_at) > STALE_REQUEST


@dg.sensor(jobs=list(deploy_jobs.values()), minimum_interval_seconds=5,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Promotes each release to its next environment once the previous one is healthy, "
                       "every blocking check passed and any required approval is given.")
def promotion_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource,
                     promotion_policy: PromotionPolicyResource) -> dg.SensorResult:
    db = database.client()
    requests = promotion_requests(db, context.instance, promotion_policy.dr_hold(db))
    for r in requests:
        context.log.info(f"promote {r.partition_key} to {r.tags['codemind/environment']}")
    return dg.SensorResult(run_requests=requests)
