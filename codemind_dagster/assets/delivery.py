"""Delivery: plan, code, tests with blocking checks, and the release candidate of each intent."""


import shutil

import dagster as dg
from pydantic import BaseModel

from codemind_dagster.agents.coding import CODE_TASK, CodeInput
from codemind_dagster.agents.planning import PLAN_TASK, PlanInput
from codemind_dagster.agents.repair import REPAIR_TASK, RepairInput
from codemind_dagster.agents.testing import CONTRACT_TASK, ContractInput
from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.business_model import BusinessModel
from codemind_dagster.domain.code import bundle_hash
from codemind_dagster.domain.intent import Intent
from codemind_dagster.domain.plan import ImplementationPlan
from codemind_dagster.domain.similarity import Neighbour
from codemind_dagster.domain.testing import CHECK_NAMES, TestReport, evaluate_checks
from codemind_dagster.resources.embeddings import Retrieval, SimilarIntentsResource
from codemind_dagster.resources.llm.router import BudgetExceeded
from codemind_dagster.resources.platform import (
    ArtifactStoreResource,
    DatabaseResource,
    ModelRouterResource,
    TestSandboxResource,
)
from codemind_dagster.resources.runtime import SERVICE_APP

OWNERS = ["team:platform"]


class GeneratedCode(BaseModel):
    artifact: str
    files: list[str]
    rules_not_implemented: list[str]


class Release(BaseModel):
    intent: str
    artifact: str
    spec_hash: str


def _budget(intent: Intent) -> float | None:
    return intent.spec.budget.llm_usd if intent.spec.budget else None


def _llm_cost(db, run_id: str, intent: str, tasks: tuple[str, ...]) -> dict[str, object]:
    """What the router's ledger recorded for this step's tasks in this run: model, tokens, cost, calls."""
    rows = [r for r in db.llm_calls(run_id=run_id, intent=intent) if r.task in tasks]
    models = sorted({f"{r.provider}/{r.model}" for r in rows})
    return {
        "llm_model": ", ".join(models) or "none",
        "llm_calls": dg.MetadataValue.int(len(rows)),
        "llm_cache_hits": dg.MetadataValue.int(sum(1 for r in rows if r.cache_hit)),
        "llm_tokens_in": dg.MetadataValue.int(sum(r.input_tokens + r.cache_write_tokens + r.cache_read_tokens
                                                  for r in rows)),
        "llm_tokens_out": dg.MetadataValue.int(sum(r.output_tokens for r in rows)),
        "llm_cost_usd": dg.MetadataValue.float(float(sum(r.cost_usd for r in rows))),
    }


def _neighbours_table(neighbours: list[Neighbour]) -> dg.MetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"intent": n.name, "similarity": float(n.similarity), "summary": n.summary})
                 for n in neighbours],
        schema=dg.TableSchema(columns=[dg.TableColumn("intent", "string"), dg.TableColumn("similarity", "float"),
                                       dg.TableColumn("summary", "string")]))


def _check_metadata(name: str, report: TestReport, threshold: float) -> dict[str, dg.MetadataValue]:
    """The figures behind each blocking check, as numbers the UI can sort and plot."""
    c = report.contract
    figures: dict[str, dict[str, dg.MetadataValue]] = {
        "contract_tests_pass": {"passed": dg.MetadataValue.int(c.passed),
                                "failed": dg.MetadataValue.int(c.failed + c.errors),
                                "skipped": dg.MetadataValue.int(c.skipped), "total": dg.MetadataValue.int(c.total)},
        "coverage_threshold": {"coverage_percent": dg.MetadataValue.float(float(report.coverage_percent)),
                               "threshold_percent": dg.MetadataValue.float(float(threshold))},
        "no_high_severity_findings": {"high": dg.MetadataValue.int(report.security_high),
                                      "medium": dg.MetadataValue.int(report.security_medium)},
    }
    return figures[name]


@dg.asset(partitions_def=intent_partitions, group_name="delivery", kinds={"python"}, owners=OWNERS,
          description="The planning agent's plan: routes, storage, files, rules it will not implement.")
def implementation_plan(context: dg.AssetExecutionContext, business_intents: Intent,
                        business_model: BusinessModel, llm: ModelRouterResource,
                        similar_intents: SimilarIntentsResource) -> ImplementationPlan:
    try:
        found = similar_intents.retrieve(business_intents)
    except Exception as e:  # noqa: BLE001 - neighbours are advice: a plan without them beats no plan
        found = Retrieval([], False, skipped=[f"retrieval failed, planning without neighbours: {e}"])
    for reason in found.skipped:
        context.log.warning(f"similar intents: {reason}")
    router = llm.router()
    plan = router.run(PLAN_TASK, PlanInput(intent=business_intents.canonical(), similar=found.neighbours),
                      intent=business_intents.name, run_id=context.run_id,
                      intent_budget_usd=_budget(business_intents))
    context.add_output_metadata({
        "similar_intents": _neighbours_table(found.neighbours),
        "similar_intents_reused": found.reused,
        "similar_intents_skipped": dg.MetadataValue.md("\n".join(f"- {r}" for r in found.skipped) or "none"),
        **{f"retrieval_{k}_ms": dg.MetadataValue.float(v) for k, v in found.timings_ms.items()},
        **_llm_cost(router.db, context.run_id, business_intents.name, (PLAN_TASK.name,)),
        "routes": dg.MetadataValue.md("\n".join(f"- `{r.method} {r.path}` ({r.operation})" for r in plan.routes)),
        "graph_nodes": len(business_model.nodes),
        "rules_not_implemented": dg.MetadataValue.md("\n".join(f"- {r}" for r in plan.rules_not_implemented)
                                                     or "none"),
    })
    return plan


@dg.asset(partitions_def=intent_partitions, group_name="delivery", kinds={"python", "fastapi"}, owners=OWNERS,
          description="The code agent's service bundle, stored by content hash.")
def generated_code(context: dg.AssetExecutionContext, business_intents: Intent,
                   implementation_plan: ImplementationPlan, llm: ModelRouterResource,
                   artifacts: ArtifactStoreResource, similar_intents: SimilarIntentsResource) -> GeneratedCode:
    # The planning step stored the neighbours of this intent version: read back, not recomputed.
    try:
        similar = similar_intents.retrieve(business_intents).neighbours
    except Exception as e:  # noqa: BLE001 - as in implementation_plan
        context.log.warning(f"similar intents: retrieval failed, coding without neighbours: {e}")
        similar = []
    router = llm.router()
    bundle = router.run(CODE_TASK, CodeInput(intent=business_intents.canonical(), plan=implementation_plan,
                                             similar=similar),
                        intent=business_intents.name, run_id=context.run_id,
                        intent_budget_usd=_budget(business_intents))
    digest = artifacts.store().put_bundle(bundle.files)
    lines = sum(text.count("\n") for text in bundle.files.values())
    context.add_output_metadata({
        "artifact": digest, "files": len(bundle.files), "lines": lines,
        "similar_intents": dg.MetadataValue.int(len(similar)),
        **_llm_cost(router.db, context.run_id, business_intents.name, (CODE_TASK.name,)),
        "rules_not_implemented": dg.MetadataValue.md("\n".join(f"- {r}" for r in bundle.rules_not_implemented)
                                                     or "none"),
    })
    return GeneratedCode(artifact=digest, files=sorted(bundle.files),
                         rules_not_implemented=bundle.rules_not_implemented)


@dg.asset(
    partitions_def=intent_partitions, group_name="delivery", kinds={"pytest"}, owners=OWNERS,
    description="Contract tests derived from the intent, run with the code's own tests in a sandbox.",
    check_specs=[dg.AssetCheckSpec(name, asset="test_results", blocking=True, description=d) for name, d in zip(
        CHECK_NAMES, ("Every contract test of spec section 2 passes.",
                      "Line coverage of service/ meets the threshold.",
                      "The static security scan (bandit) finds nothing of high severity."),
        strict=True)],
)
def test_results(context: dg.AssetExecutionContext, business_intents: Intent, generated_code: GeneratedCode,
                 llm: ModelRouterResource, artifacts: ArtifactStoreResource, sandbox: TestSandboxResource,
                 database: DatabaseResource):
    intent, router, db, store = business_intents, llm.router(), database.client(), artifacts.store()
    suite = router.run(CONTRACT_TASK, ContractInput(intent=intent.canonical()), intent=intent.name,
                       run_id=context.run_id, intent_budget_usd=_budget(intent))
    artifact = generated_code.artifact
    report, reused, evidence = _test_artifact(context, intent, artifact, suite, db, store, sandbox)
    repairs: list[str] = []
    for rnd in range(1, sandbox.repair_rounds + 1):
        checks = evaluate_checks(report, sandbox.coverage_threshold)
        if all(c.passed for c in checks.values()):
            break
        failures = report.failures + [f"check {n} failed: {c.detail}" for n, c in checks.items() if not c.passed]
        try:
            fixed = router.run(REPAIR_TASK, RepairInput(intent=intent.canonical(), files=store.read_bundle(artifact),
                                                        failures=failures, round=rnd),
                               intent=intent.name, run_id=context.run_id, intent_budget_usd=_budget(intent))
        except BudgetExceeded as e:
            repairs.append(f"round {rnd}: not attempted: {e}")
            break
        repaired = store.put_bundle(fixed.files)
        if repaired == artifact:
            repairs.append(f"round {rnd}: the code agent returned the same code; stopped")
            break
        artifact = repaired
        report, reused, evidence = _test_artifact(context, intent, artifact, suite, db, store, sandbox)
        repairs.append(f"round {rnd}: {artifact[:12]}: {report.passed} passed, {report.failed} failed")
        context.log.info(f"repair {repairs[-1]}")
    yield dg.Output(report, metadata={
        "artifact": report.artifact, "reused_from_earlier_run": reused,
        "contract_passed": report.contract.passed, "contract_failed": report.contract.failed + report.contract.errors,
        "own_passed": report.own.passed, "own_failed": report.own.failed + report.own.errors,
        "coverage_percent": report.coverage_percent, "security_high": report.security_high,
        "duration_s": report.duration_s, "sandbox": report.sandbox_reason or "ok",
        "failures": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in report.failures) or "none"),
        "repairs": dg.MetadataValue.md("\n".join(f"- {r}" for r in repairs) or "none"),
        "evidence": dg.MetadataValue.path(str(evidence)),
        **_llm_cost(db, context.run_id, intent.name, (CONTRACT_TASK.name, REPAIR_TASK.name)),
    })
    for name, outcome in evaluate_checks(report, sandbox.coverage_threshold).items():
        yield dg.AssetCheckResult(check_name=name, passed=outcome.passed, metadata={
            "detail": outcome.detail, **_check_metadata(name, report, sandbox.coverage_threshold)})


def _test_artifact(context, intent: Intent, artifact: str, suite, db, store, sandbox: TestSandboxResource):
    """Test one artifact with the contract suite, or reuse the evidence of an identical earlier test."""
    key = bundle_hash({"code": artifact, **suite.files})
    evidence = store.root / "test-evidence" / key
    stored = db.test_run(intent.name, key)
    # A run the sandbox cut short (time or memory limit) says more about the limits than the code: test it again.
    if stored is not None and not stored.get("sandbox_reason"):
        return TestReport.model_validate(stored), True, evidence
    box = sandbox.sandbox()
    workdir = box.root / f"{intent.name}-{key[:12]}-{context.run_id[:8]}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        report = sandbox.test(context, bundle=store.read_bundle(artifact), suite=suite, artifact=artifact,
                              workdir=workdir)
        store.keep_evidence(key, [workdir / n for n in ("junit.xml", "coverage.json", "bandit.json")])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    db.save_test_run(intent.name, key, report.model_dump(mode="json"))
    return report, False, evidence


@dg.asset(partitions_def=intent_partitions, group_name="delivery", kinds={"python"}, owners=OWNERS,
          description="The tested bundle, released for promotion (recorded in the platform DB).")
def release_candidate(context: dg.AssetExecutionContext, business_intents: Intent, generated_code: GeneratedCode,
                      test_results: TestReport, database: DatabaseResource, artifacts: ArtifactStoreResource,
                      ) -> Release:
    db = database.client()
    artifact = test_results.artifact  # the tested one: a repair may have replaced the generated code
    latest = db.latest_release(business_intents.name)
    if latest is None or latest.artifact != artifact or latest.spec_hash != business_intents.content_hash:
        db.add_release(business_intents.name, artifact, business_intents.content_hash, context.run_id)
    db.set_intent_error(business_intents.name, None)
    context.add_output_metadata({
        "artifact": artifact, "repaired": artifact != generated_code.artifact,
        "bundle": dg.MetadataValue.path(str(artifacts.store().bundle_dir(artifact))),
        # What the runtime starts: the platform layer in front of the bundle's own app (resources/runtime.py).
        "command": f"python -m uvicorn {SERVICE_APP} --host 127.0.0.1 --port $PORT",
        "tests_passed": test_results.passed, "coverage_percent": test_results.coverage_percent,
        "environments": ", ".join(business_intents.spec.promotion.environments),
    })
    return Release(intent=business_intents.name, artifact=artifact, spec_hash=business_intents.content_hash)
