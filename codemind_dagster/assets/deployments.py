"""Deployments: one asset per environment; a release reaches one only through promotion."""


import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.intent import ENVIRONMENTS, Intent
from codemind_dagster.domain.loadtest import (
    GATE_PREFIX,
    LoadTestResult,
    evaluate_slo,
    gate_message,
    is_gate_hold,
)
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.platform import (
    ArtifactStoreResource,
    DatabaseResource,
    IntentStoreResource,
    PromotionPolicyResource,
    RuntimeResource,
)

ARTIFACT_TAG = "codemind/artifact"
# A drill: `error_rate=0.5 latency_ms=200 status=503` deploys the release with CODEMIND_FAULT_* set, so the
# canary's analysis and rollback can be exercised on purpose.
FAULTS_TAG = "codemind/faults"
CANARY_ENV = "production"
OWNERS = ["team:platform"]
LOAD_TEST_ENV = "staging"
SLO_CHECK = "load_test_meets_slo"


def _deployment_asset(env: str, upstream: str) -> dg.AssetsDefinition:
    load_tested = env == LOAD_TEST_ENV
    if env == CANARY_ENV:
        description = ("The release serving production. A new release takes a growing share of traffic (10%, 50%, "
                       "100% by default); at each step its error rate and p95 are compared with the stable "
                       "release's and with the intent's slo, and a worse canary is rolled back.")
    else:
        description = f"The release running in {env}: blue/green cutover, automatic rollback when unhealthy."
    if load_tested:
        description += (" Each deploy is load tested (creates, reads, lists, updates from the intent); with an "
                        "slo in the intent, a miss keeps the release out of the next environment.")
    # Not blocking in Dagster's sense (that would fail the deploy run of a release that is live and healthy):
    # the promotion rules read the gate's verdict and keep the next environment closed.
    checks = [dg.AssetCheckSpec(SLO_CHECK, asset=f"{env}_deployment", description=(
        "The staging load test meets the intent's slo (p95_latency_ms, availability); a failure keeps the "
        "release out of production."))] if load_tested else None

    @dg.asset(
        name=f"{env}_deployment", partitions_def=intent_partitions, group_name="deployment", deps=[upstream],
        kinds={"python", "fastapi"}, owners=OWNERS, tags={"environment": env}, description=description,
        check_specs=checks,
    )
    def deployment(context: dg.AssetExecutionContext, database: DatabaseResource, runtime: RuntimeResource,
                   artifacts: ArtifactStoreResource, intent_store: IntentStoreResource,
                   promotion_policy: PromotionPolicyResource) -> dg.MaterializeResult:
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
        held = _gate_hold(db, name, env, artifact)
        if held:
            raise dg.Failure(f"{env} keeps its current release: {held}")
        faults = _faults_of_tag(context.run.tags.get(FAULTS_TAG))
        rollout = promotion_policy.rollout(intent, env) if env == CANARY_ENV else None
        # A drill exercises the rollback path; it is no verdict on the release, so promotions are left alone.
        promoting = not faults
        if promoting:
            db.request_promotion(name, env, artifact)
            db.set_promotion(name, env, artifact, "running", run_id=context.run_id)
        dep_id = db.start_deployment(name, env, artifact, context.run_id)
        context.log.info(f"deploying {name} {artifact[:12]} to {env}")
        if faults:
            context.log.warning(f"fault drill: {name} {artifact[:12]} deploys to {env} with {faults}")
        outcome = rt.deploy(service=name, environment=env, artifact=artifact,
                            bundle_dir=artifacts.store().bundle_dir(artifact), env=faults or None, rollout=rollout)
        canary_meta = _canary_metadata(outcome.canary)
        if outcome.outcome not in ("deployed", "unchanged"):
            db.finish_deployment(dep_id, outcome.outcome, detail=outcome.reason)
            if promoting:
                db.set_promotion(name, env, artifact, "failed", detail=outcome.reason)
            raise dg.Failure(f"deploy of {name} to {env} {outcome.outcome}: {outcome.reason}",
                             metadata={"previous_artifact": outcome.previous_artifact or "none", **canary_meta})
        metadata = {
            "url": dg.MetadataValue.url(outcome.url), "artifact": artifact, "pid": outcome.pid,
            "outcome": outcome.outcome, "previous_artifact": outcome.previous_artifact or "none",
            "duration_s": round(outcome.duration_s, 3), **canary_meta,
        }
        if faults:
            metadata["faults"] = " ".join(f"{k}={v}" for k, v in sorted(faults.items()))
        check_results = []
        if load_tested:
            # Before the release is recorded live here: the promotion sensor never sees it without the verdict.
            passed, detail, load_meta = _load_test_gate(context, db, promotion_policy, intent, envs, artifact,
                                                        outcome.url)
            metadata.update(load_meta)
            check_results.append(dg.AssetCheckResult(check_name=SLO_CHECK, passed=passed,
                                                     metadata={"detail": detail, **load_meta}))
        db.finish_deployment(dep_id, "live", url=outcome.url, pid=outcome.pid, detail=outcome.outcome)
        if promoting:
            db.set_promotion(name, env, artifact, "done")
        return dg.MaterializeResult(metadata=metadata, check_results=check_results or None)

    return deployment


deployment_assets = [
    _deployment_asset(env, "release_candidate" if i == 0 else f"{ENVIRONMENTS[i - 1]}_deployment")
    for i, env in enumerate(ENVIRONMENTS)
]


def _gate_hold(db: PlatformDB, intent: str, env: str, artifact: str) -> str | None:
    """The load-test gate's reason when it closed `env` to this artifact, else None."""
    row = next((p for p in db.promotions(intent) if p.environment == env and p.artifact == artifact), None)
    return row.detail if row is not None and row.status == "failed" and is_gate_hold(row.detail) else None


def _load_test_gate(context: dg.AssetExecutionContext, db: PlatformDB, policy: PromotionPolicyResource,
                    intent: Intent, envs: list[str], artifact: str, url: str) -> tuple[bool, str, dict]:
    """Load test the release at `url`, record the SLO verdict on the next environment; (passed, detail, metadata)."""
    slo = intent.spec.slo
    context.log.info(f"load testing {intent.name} {artifact[:12]} at {url} for {policy.loadtest_duration_s:g} s "
                     f"with {policy.loadtest_concurrency} concurrent clients")
    result: LoadTestResult | None = None
    try:
        result = policy.load_test(url, intent)
    except Exception as e:  # noqa: BLE001 - any failure to measure is a failure to show the SLO is met
        error = f"the load test could not run: {type(e).__name__}: {e}"
        if slo is None:  # without an slo the figures are evidence, never a gate
            passed, detail, hold = True, f"no slo in the intent, not gated; {error}", None
        else:
            passed, detail, hold = False, error, f"{GATE_PREFIX}SLO not verified for {artifact[:12]}: {error}"
    else:
        if slo is None:
            passed, detail, hold = True, "no slo in the intent: measured, not gated", None
        else:
            verdict = evaluate_slo(result, p95_latency_ms=slo.p95_latency_ms, availability=slo.availability)
            passed, detail = verdict.met, verdict.detail or "the slo sets no objective"
            hold = None if verdict.met else gate_message(artifact, verdict)
    nxt = envs[envs.index(LOAD_TEST_ENV) + 1] if envs.index(LOAD_TEST_ENV) + 1 < len(envs) else None
    if nxt is not None:
        _record_gate(db, intent.name, nxt, artifact, hold)
    (context.log.info if passed else context.log.warning)(f"load test of {intent.name}: {detail}")
    return passed, detail, _load_metadata(result, slo, passed, detail)


def _record_gate(db: PlatformDB, intent: str, env: str, artifact: str, hold: str | None) -> None:
    """Close `env` to the artifact (a failed promotion whose reason is the gate's), or reopen it after a pass."""
    row = next((p for p in db.promotions(intent) if p.environment == env and p.artifact == artifact), None)
    if hold is not None:
        if row is None or row.status in ("requested", "failed", "resume"):
            db.request_promotion(intent, env, artifact)
            db.set_promotion(intent, env, artifact, "failed", detail=hold[:2000])
    elif row is not None and row.status == "failed" and is_gate_hold(row.detail):
        # A later load test of the same artifact passed: the promotion sensor may take it on from here.
        db.set_promotion(intent, env, artifact, "resume")


def _load_metadata(result: LoadTestResult | None, slo, passed: bool, detail: str) -> dict:
    """Floats per materialization (the UI plots them over releases) and a table per operation."""
    meta: dict = {"load_test_slo_met": passed, "load_test_detail": detail}
    if slo is not None:
        meta["load_test_slo"] = ", ".join(
            f"{k} {v:g}{' ms' if k == 'p95_latency_ms' else '%'}"
            for k, v in (("p95_latency_ms", slo.p95_latency_ms), ("availability", slo.availability)) if v is not None
        ) or "none"
    if result is None or result.requests == 0:
        return meta
    fl = dg.MetadataValue.float
    meta.update({
        "load_test_p50_ms": fl(round(result.p50_ms, 3)), "load_test_p95_ms": fl(round(result.p95_ms, 3)),
        "load_test_p99_ms": fl(round(result.p99_ms, 3)), "load_test_max_ms": fl(round(result.max_ms, 3)),
        "load_test_error_rate": fl(round(result.error_rate, 6)),
        "load_test_availability_percent": fl(round(result.availability_percent, 4)),
        "load_test_rps": fl(round(result.rps, 1)), "load_test_requests": dg.MetadataValue.int(result.requests),
        "load_test_errors": dg.MetadataValue.int(result.errors),
        "load_test_duration_s": fl(round(result.duration_s, 3)),
        "load_test_concurrency": dg.MetadataValue.int(result.concurrency),
        "load_test_operations": dg.MetadataValue.table(
            records=[dg.TableRecord({"operation": o.operation, "requests": o.requests, "errors": o.errors,
                                     "p50_ms": round(o.p50_ms, 3), "p95_ms": round(o.p95_ms, 3),
                                     "p99_ms": round(o.p99_ms, 3)}) for o in result.operations],
            schema=dg.TableSchema(columns=[
                dg.TableColumn("operation", "string"), dg.TableColumn("requests", "int"),
                dg.TableColumn("errors", "int"), dg.TableColumn("p50_ms", "float"),
                dg.TableColumn("p95_ms", "float"), dg.TableColumn("p99_ms", "float")])),
    })
    if result.error_examples:
        meta["load_test_error_examples"] = dg.MetadataValue.md("\n".join(f"- `{e}`" for e in result.error_examples))
    return meta


def _faults_of_tag(tag: str | None) -> dict[str, str]:
    """CODEMIND_FAULT_* from a drill's `codemind/faults` tag (`error_rate=0.5 latency_ms=200 status=503`)."""
    from codemind_dagster.resources.service_support import FAULT_VARS

    known = {v.removeprefix("CODEMIND_FAULT_").lower(): v for v in FAULT_VARS}
    out: dict[str, str] = {}
    for word in (tag or "").replace(",", " ").split():
        key, sep, value = word.partition("=")
        if not sep or key.lower() not in known or not value:
            raise dg.Failure(f"tag {FAULTS_TAG}={tag!r}: expected words like error_rate=0.5 latency_ms=200 "
                             f"status=503 (known: {', '.join(sorted(known))}); nothing was deployed")
        out[known[key.lower()]] = value
    try:
        from codemind_dagster.resources.service_support import Faults

        Faults.from_env(out)
    except ValueError as e:
        raise dg.Failure(f"tag {FAULTS_TAG}={tag!r}: {e}; nothing was deployed") from None
    return out


def _canary_metadata(rows: tuple[dict, ...]) -> dict:
    """Each canary step's figures as a table, and the canary's served shares and error rates as floats."""
    if not rows:
        return {}
    columns = [("weight", "int"), ("served_percent", "float"), ("passed", "bool"), ("canary_requests", "int"),
               ("canary_error_rate", "float"), ("canary_p95_ms", "float"), ("stable_requests", "int"),
               ("stable_error_rate", "float"), ("stable_p95_ms", "float"), ("source", "string"),
               ("detail", "string")]
    last = rows[-1]
    return {
        "canary_steps": dg.MetadataValue.table(
            records=[dg.TableRecord({k: r[k] for k, _ in columns if r[k] is not None}) for r in rows],
            schema=dg.TableSchema(columns=[dg.TableColumn(k, t) for k, t in columns])),
        "canary_passed": all(r["passed"] for r in rows),
        "canary_last_weight": dg.MetadataValue.int(last["weight"]),
        "canary_error_rate": dg.MetadataValue.float(float(last["canary_error_rate"])),
    }
