"""The code location: assets, checks, jobs and sensors of the active profile."""

from __future__ import annotations

import dagster as dg

from codemind_dagster.assets.delivery import generated_code, implementation_plan, release_candidate, test_results
from codemind_dagster.assets.deployments import deployment_assets
from codemind_dagster.assets.dr import defs as dr_defs
from codemind_dagster.assets.intake import business_intents, business_model
from codemind_dagster.assets.platform import defs as platform_defs
from codemind_dagster.jobs import deliver_intent, deploy_jobs
from codemind_dagster.resources.profiles import resources_for
from codemind_dagster.sensors.intents import intent_sensor
from codemind_dagster.sensors.promotion import promotion_sensor
from codemind_dagster.settings import Settings


delivery_defs = dg.Definitions(
    assets=[business_intents, business_model, implementation_plan, generated_code, test_results,
            release_candidate, *deployment_assets],
    jobs=[deliver_intent, *deploy_jobs.values()],
    sensors=[intent_sensor, promotion_sensor],
)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """Every domain's definitions, with the resources of the active profile."""
    return dg.Definitions.merge(
        delivery_defs, platform_defs, dr_defs,
        dg.Definitions(resources=resources_for(settings or Settings.from_env())),
    )


defs = build_definitions()
