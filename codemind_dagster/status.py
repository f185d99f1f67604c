"""What every intent is doing: the data behind `codemind status` and the demo summary."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from codemind_dagster.domain.intent import Intent
from codemind_dagster.domain.testing import TestReport, evaluate_checks
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.sensors.promotion import release_states
from codemind_dagster.settings import Settings


def platform_status(settings: Settings, db: PlatformDB, runtime) -> dict[str, Any]:
    """The JSON document of `codemind status --json`."""
    from codemind_dagster.resources.platform import PromotionPolicyResource

    policy = PromotionPolicyResource.from_settings(settings)
    decisions = {s.intent: s for s in release_states(db, policy.dr_hold(db))}
    live = db.live_deployments()
    rows = db.intent_rows()
    # Health is checked live, in parallel: a status that trusts old records would hide drift.
    targets = [(r.name, env) for r in rows for env in Intent.model_validate(r.spec).spec.promotion.environments]
    with ThreadPoolExecutor(max_workers=8) as pool:
        health = dict(zip(targets, pool.map(lambda t: runtime.status(*t), targets), strict=True))
    intents = []
    for row in rows:
        intent = Intent.model_validate(row.spec)
        envs = intent.spec.promotion.environments
        raw = db.latest_test_run(row.name)
        report = TestReport.model_validate(raw) if raw else None
        checks = {k: v.passed for k, v in evaluate_checks(report, settings.coverage_threshold).items()} if report else {}
        environments = {}
        for env in envs:
            rec, rt = live.get((row.name, env)), health[(row.name, env)]
            environments[env] = {
                "url": rt.url if rt else (rec.url if rec else None),
                "healthy": bool(rt and rt.healthy),
                "artifact": rec.artifact if rec else None,
                "pid": rt.pid if rt else None,
                "rollout": rt.rollout if rt else None,
            }
        held = any(p.status == "stopped" for p in db.promotions(row.name))
        release = decisions.get(row.name)
        state = "stopped" if held else _state(row, report, checks, release, environments, envs)
        intents.append({
            "name": row.name, "state": state,
            "tests": {"passed": report.passed if report else 0, "failed": report.failed if report else 0},
            "coverage_percent": report.coverage_percent if report else None,
            "checks": checks, "environments": environments,
            "llm_cost_usd": round(db.llm_spend(intent=row.name), 6),
            "error": row.error,
            # Why the release does not move on, when a gate holds it (the staging load test's SLO verdict).
            "gate": _gate(release),
        })
    from codemind_dagster.resources.budget_alerts import alerts_for_status

    return {"intents": intents, "rejected": [{"file": r.file, "error": r.error} for r in db.rejections()],
            "budget_alerts": alerts_for_status(db, daily_budget_usd=settings.daily_llm_budget_usd)}


def _gate(release) -> dict[str, str] | None:
    if release is None or release.decision.action != "slo_failed":
        return None
    d = release.decision
    return {"environment": d.environment, "reason": d.reason}


def _state(row, report, checks, release, environments, envs) -> str:
    if row.error:
        return "failed"
    if report is not None and checks and not all(checks.values()) and release is None:
        return "failed"
    if release is None:
        return "queued" if row.requested_hash == row.spec_hash else "submitted"
    d = release.decision
    if d.action == "done":
        return "live" if environments[envs[-1]]["healthy"] else "unhealthy"
    if d.action == "await_approval":
        return f"awaiting approval for {d.environment}"
    if d.action == "await_dr":
        return "awaiting DR validation for production"
    if d.action == "slo_failed":
        return f"held before {d.environment}: {d.reason}"
    if d.action == "blocked":
        return "failed" if "failed" in d.reason else "blocked"
    return f"promoting to {d.environment}"
