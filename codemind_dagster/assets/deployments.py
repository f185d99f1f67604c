"""Deployments: one asset per environment; a release reaches one only through promotion."""


import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.intent import ENVIRONMENTS
from codemind_dagster.resources.platform import (
    ArtifactStoreResource,
    DatabaseResource,
    IntentStoreResource,
    RuntimeResource,
)

ARTIFACT_TAG = "codemind/artifact"
OWNERS = ["team:platform"]


def _deployment_asset(env: str, upstream: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{env}_deployment", partitions_def=intent_partitions, group_name="deployment", deps=[upstream],
        kinds={"python", "fastapi"}, owners=OWNERS, tags={"environment": env},
        description=f"The release running in {env}: blue/green cutover, automatic rollback when unhealthy.",
    )
    def deployment(context: dg.AssetExecutionContext, database: DatabaseResource, runtime: RuntimeResource,
                   artifacts: ArtifactStoreResource, intent_store: IntentStoreResource) -> dg.MaterializeResult:
        name = context.partition_key
        db, rt = database.client(), runtime.runtime()
        intent = intent_store.store().load(name)
        envs = intent.spec.promotion.environments
        if env not in envs:
            raise dg.Failure(f"{name} does not deploy to {env} (environments: {', '.join(envs)})")
        release = db.latest_release(name)
        artifact = context.run.tags.get(ARTIFACT_TAG) or (release.artifact if release else None)
        if artifact is None:
            raise dg.Failure(f"{name} has no release candidate yet: materialize release_candidate first")
        previous = envs[envs.index(env) - 1] if envs.index(env) > 0 else None
        if previous:
            live = db.live_deployments(name).get((name, previous))
            if live is None or live.artifact != artifact:
                raise dg.Failure(f"{previous} does not run {artifact[:12]}; promote it there first")
            status = rt.status(name, previous)
            if status is None or not status.healthy:
                raise dg.Failure(f"{previous} is not healthy; {env} keeps its current release")
        db.request_promotion(name, env, artifact)
        db.set_promotion(name, env, artifact, "running", run_id=context.run_id)
        dep_id = db.start_deployment(name, env, artifact, context.run_id)
        context.log.info(f"deploying {name} {artifact[:12]} to {env}")
        outcome = rt.deploy(service=name, environment=env, artifact=artifact,
                            bundle_dir=artifacts.store().bundle_dir(artifact))
        if outcome.outcome not in ("deployed", "unchanged"):
            db.finish_deployment(dep_id, outcome.outcome, detail=outcome.reason)
            db.set_promotion(name, env, artifact, "failed", detail=outcome.reason)
            raise dg.Failure(f"deploy of {name} to {env} {outcome.outcome}: {outcome.reason}",
                             metadata={"previous_artifact": outcome.previous_artifact or "none"})
        db.finish_deployment(dep_id, "live", url=outcome.url, pid=outcome.pid, detail=outcome.outcome)
        db.set_promotion(name, env, artifact, "done")
        return dg.MaterializeResult(metadata={
            "url": dg.MetadataValue.url(outcome.url), "artifact": artifact, "pid": outcome.pid,
            "outcome": outcome.outcome, "previous_artifact": outcome.previous_artifact or "none",
            "duration_s": round(outcome.duration_s, 3),
        })

    return deployment


deployment_assets = [
    _deployment_asset(env, "release_candidate" if i == 0 else f"{ENVIRONMENTS[i - 1]}_deployment")
    for i, env in enumerate(ENVIRONMENTS)
]
