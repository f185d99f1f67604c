"""Jobs: the per-intent delivery pipeline and one deploy job per environment."""


import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.intent import ENVIRONMENTS


@dg.failure_hook(required_resource_keys={"database"})
def record_failure(context: dg.HookContext) -> None:
    """Keep the latest failure of an intent's pipeline where `codemind status` can show it."""
    run = context.instance.get_run_by_id(context.run_id)
    intent = run.tags.get("dagster/partition") if run else None
    if intent:
        err = context.op_exception
        msg = getattr(err, "description", None) or str(err) or type(err).__name__
        context.resources.database.client().set_intent_error(intent, f"{context.step_key}: {msg}"[:2000])


# The executor is the profile's (executors.py): in-process locally, a pod per step on k8s.
deliver_intent = dg.define_asset_job(
    "deliver_intent",
    selection=dg.AssetSelection.groups("intake", "delivery"),
    partitions_def=intent_partitions,
    hooks={record_failure},
    description="Intent to release candidate: model, plan, code, tests and blocking checks.",
)

deploy_jobs = {
    env: dg.define_asset_job(
        f"deploy_{env}", selection=dg.AssetSelection.assets(f"{env}_deployment"),
        partitions_def=intent_partitions, executor_def=dg.in_process_executor, hooks={record_failure},
        description=f"Deploy a release to {env}; requested by the promotion sensor.",
    )
    for env in ENVIRONMENTS
}
