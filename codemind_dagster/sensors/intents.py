"""The intent sensor: watched directory in, one partition and one pipeline run per new spec out."""


import json
from pathlib import Path

import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.jobs import deliver_intent
from codemind_dagster.resources.platform import IntentStoreResource, ModelRouterResource
from codemind_dagster.sensors.intent_drafts import draft_drop, text_files

SPEC_HASH_TAG = "codemind/spec_hash"


@dg.sensor(job=deliver_intent, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Validates intent files in $CODEMIND_HOME/intents and starts the pipeline of each new "
                       "or changed intent; invalid files are rejected with their error. Requests in plain "
                       "words (*.md, *.txt) are drafted into intent files by the model router first.")
def intent_sensor(context: dg.SensorEvaluationContext, intent_store: IntentStoreResource,
                  llm: ModelRouterResource) -> dg.SensorResult:
    store = intent_store.store()
    # The cursor holds each file's (mtime, size): unchanged files are not even read again.
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen, observations = {}, []
    observations += _draft_requests(context, store, llm, cursor, seen)
    for path in store.files():
        st = path.stat()
        seen[str(path)] = sig = f"{st.st_mtime_ns}:{st.st_size}"
        if cursor.get(str(path)) == sig:
            continue
        result = store.ingest(path)
        if result.status == "rejected":
            context.log.warning(f"rejected {path.name}: {result.error}")
            observations.append(dg.AssetObservation(
                asset_key="business_intents", metadata={"rejected_file": str(path), "error": result.error or ""}))
        elif result.status != "unchanged":
            context.log.info(f"{result.status} intent {result.name} from {path.name}")
    pending = store.pending()
    known = set(context.instance.get_dynamic_partitions(intent_partitions.name))
    new_keys = sorted({name for name, _ in pending} - known)
    for name, spec_hash in pending:
        store.db.mark_requested(name, spec_hash)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=f"{name}@{spec_hash[:16]}",
                                    tags={SPEC_HASH_TAG: spec_hash}) for name, spec_hash in pending],
        dynamic_partitions_requests=[intent_partitions.build_add_request(new_keys)] if new_keys else [],
        asset_events=observations,
        cursor=json.dumps(seen, sort_keys=True),
    )


def _draft_requests(context: dg.SensorEvaluationContext, store, llm: ModelRouterResource, cursor: dict,
                    seen: dict) -> list[dg.AssetObservation]:
    """Draft at most one new or changed request per tick: a model call is slow, and a tick has a deadline."""
    observations, drafted_one = [], False
    for path in text_files(store.dir):
        st = path.stat()
        sig = f"{st.st_mtime_ns}:{st.st_size}"
        if cursor.get(str(path)) == sig:
            seen[str(path)] = sig  # refused before and unchanged since: not asked (or paid for) again
            continue
        if drafted_one:
            continue  # left out of the cursor: the next tick drafts it
        drafted_one = True
        router = llm.router()
        try:
            drop = draft_drop(path, store, router)
        finally:
            router.close()
        if drop.status == "rejected":
            seen[str(path)] = sig
            context.log.warning(f"rejected {path.name}: {drop.error}")
            observations.append(dg.AssetObservation(
                asset_key="business_intents", metadata={"rejected_file": str(path), "error": drop.error or ""}))
        else:
            context.log.info(f"drafted {Path(drop.draft).name} from {path.name} (${drop.cost_usd:.6f}); "
                             f"the request moved to {path.parent.name}/drafted/")
    return observations
