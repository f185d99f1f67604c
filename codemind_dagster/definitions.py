"""The code location: every domain's assets, checks, jobs, schedules and sensors, with the profile's resources."""

from __future__ import annotations

import dagster as dg

from codemind_dagster.assets import dr, platform
from codemind_dagster.assets.delivery import (
    generated_code,
    implementation_plan,
    release_candidate,
    test_results,
)
from codemind_dagster.assets.deployments import deployment_assets
from codemind_dagster.assets.finops import cost_report_job, finops_assets
from codemind_dagster.assets.intake import business_intents, business_model
from codemind_dagster.executors import executor_for
from codemind_dagster.jobs import deliver_intent, deploy_jobs
from codemind_dagster.resources.profiles import resources_for
from codemind_dagster.sensors.budget import budget_sensor
from codemind_dagster.sensors.intents import intent_sensor
from codemind_dagster.sensors.promotion import promotion_sensor
from codemind_dagster.settings import Settings


def _delivery() -> dg.Definitions:
    return dg.Definitions(
        assets=[business_intents, business_model, implementation_plan, generated_code, test_results,
                release_candidate, *deployment_assets],
        jobs=[deliver_intent, *deploy_jobs.values()],
        sensors=[intent_sensor, promotion_sensor],
    )


def _finops() -> dg.Definitions:
    return dg.Definitions(assets=finops_assets, jobs=[cost_report_job], sensors=[budget_sensor])


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Every domain's definitions, with the resources of the active profile."""
    # Domain modules keep their defs as module attributes: one Definitions at module scope here.
    s = settings or Settings.from_env()
    return dg.Definitions.merge(
        _delivery(), platform.defs, dr.defs, _finops(),
        dg.Definitions(resources=resources_for(s), executor=executor_for(s)),
    )


defs = build_definitions()
