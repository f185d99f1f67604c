"""The intent sensor: watched directory in, one partition and one pipeline run per new spec out."""


import json

import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.jobs import deliver_intent
from codemind_dagster.resources.platform import IntentStoreResource

SPEC_HASH_TAG = "codemind/spec_hash"


@dg.sensor(job=deliver_intent, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Validates intent files in $CODEMIND_HOME/intents and starts the pipeline of each new "
                       "or changed intent; invalid files are rejected with their error.")
def intent_sensor(context: dg.SensorEvaluationContext, intent_store: IntentStoreResource) -> dg.SensorResult:
    store = intent_store.store()
    # The cursor holds each file's (mtime, size): unchanged files are not even read again.
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen, observations = {}, []
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
