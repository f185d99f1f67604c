"""The staging load test: figures, the SLO verdict, the workload on a real generated service, and the gate."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import httpx
import pytest

from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.code import write_bundle
from codemind_dagster.domain.intent import IntentError, parse_intent_text, read_intent_file
from codemind_dagster.domain.loadtest import GATE_PREFIX, Sample, evaluate_slo, percentile, summarize
from codemind_dagster.domain.promotion import next_step
from codemind_dagster.resources.loadtest import Workload, field_value, run_load_test
from codemind_dagster.resources.runtime import LocalRuntime
from codemind_dagster.sensors.promotion import promotion_requests

INTENT = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: NAME}
spec:
  summary: Members and the plants they own.
  entities:
    - name: Member
      fields:
        - {name: email, type: string, required: true, unique: true, format: email, max_length: 60}
        - {name: level, type: string, enum: [seed, sprout], default: seed}
        - {name: age, type: integer, minimum: 18, maximum: 130}
    - name: Plant
      fields:
        - {name: owner, type: ref, to: Member, required: true, on_delete: cascade}
        - {name: species, type: string, required: true, min_length: 3, max_length: 40}
        - {name: height_cm, type: number, minimum: 0.5, maximum: 300}
      operations: [create, read, list]
  slo: SLO
"""


def intent_text(name: str, slo: str) -> str:
    return INTENT.replace("NAME", name).replace("SLO", slo)


# ------------------------------------------------------------------------------------------ pure figures


def test_percentiles_interpolate_between_ranks():
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="outside 0-100"):
        percentile(xs, 101)


def test_summary_counts_errors_per_operation():
    samples = [Sample("create", "A", 10.0, True, 201), Sample("read", "A", 2.0, True, 200),
               Sample("read", "A", 4.0, False, 500, "GET /as/1 -> 500: boom"), Sample("list", "A", 3.0, True, 200)]
    r = summarize(samples, duration_s=2.0, concurrency=2)
    assert (r.requests, r.errors, r.rps) == (4, 1, 2.0)
    assert r.availability_percent == pytest.approx(75.0)
    assert {o.operation: (o.requests, o.errors) for o in r.operations} == {
        "create": (1, 0), "read": (2, 1), "list": (1, 0)}
    assert r.error_examples == ["read A: GET /as/1 -> 500: boom"]


def test_slo_verdict_names_the_objective_and_the_margin():
    r = summarize([Sample("read", "A", ms, True, 200) for ms in (1.0, 2.0, 3.0, 40.0)], duration_s=1,
                  concurrency=1)
    miss = evaluate_slo(r, p95_latency_ms=0.001, availability=None)
    assert not miss.met
    [breach] = miss.breaches
    assert breach.startswith(f"p95 latency {r.p95_ms:.2f} ms exceeds p95_latency_ms 0.001 ms by ")
    assert evaluate_slo(r, p95_latency_ms=10000, availability=99.9).met

    failing = summarize([Sample("read", "A", 1.0, i != 0, 200 if i else 503) for i in range(10)],
                        duration_s=1, concurrency=1)
    v = evaluate_slo(failing, p95_latency_ms=10000, availability=99.9)
    assert not v.met and "availability 90.000% is below availability 99.9% by 9.900 points" in v.detail
    assert not evaluate_slo(summarize([], duration_s=1, concurrency=1), p95_latency_ms=10000, availability=None).met


@pytest.mark.parametrize(("kw", "message"), [
    ({"p95_latency_ms": 0, "availability": None}, "p95_latency_ms must be a positive"),
    ({"p95_latency_ms": None, "availability": 120.0}, "availability is a percentage"),
    ({"p95_latency_ms": math.nan, "availability": None}, "p95_latency_ms must be a positive"),
])
def test_slo_thresholds_out_of_range_are_refused(kw, message):
    r = summarize([Sample("read", "A", 1.0, True, 200)], duration_s=1, concurrency=1)
    with pytest.raises(ValueError, match=message):
        evaluate_slo(r, **kw)


@pytest.mark.parametrize(("slo", "where", "message"), [
    ("{availability: 0.999}", "spec.slo.availability", "availability is a percentage, e.g. 99.9"),
    ("{availability: 101}", "spec.slo.availability", "less than or equal to 100"),
    ("{p95_latency_ms: 0}", "spec.slo.p95_latency_ms", "greater than 0"),
    ("{p95: 200}", "spec.slo.p95", "p95_latency_ms"),
])
def test_a_bad_slo_is_rejected_with_its_path(slo, where, message):
    with pytest.raises(IntentError) as e:
        parse_intent_text(intent_text("garden", slo), "garden.yaml")
    assert f"garden.yaml: {where}: " in str(e.value) and message in str(e.value)


# ------------------------------------------------------------------------------------------ the workload


def test_workload_values_follow_the_field_rules():
    intent = parse_intent_text(intent_text("garden", "{p95_latency_ms: 200}"))
    work = Workload(intent, nonce=7)
    assert work.order == ["Member", "Plant"]  # the referenced parent first
    member, plant = intent.spec.entities
    emails = {field_value(member.fields[0], n, 7) for n in range(500)}
    assert len(emails) == 500 and all(len(e) <= 60 and "@" in e for e in emails)
    assert {field_value(member.fields[1], n, 7) for n in range(5)} == {"seed", "sprout"}
    assert all(18 <= field_value(member.fields[2], n, 7) <= 130 for n in range(50))
    assert all(0.5 <= field_value(plant.fields[2], n, 7) <= 300 for n in range(50))
    # A unique enum runs out: no value rather than a duplicate.
    code = parse_intent_text(intent_text("codes", "{}").replace(
        "{name: level, type: string, enum: [seed, sprout], default: seed}",
        "{name: level, type: string, enum: [seed, sprout], unique: true}")).spec.entities[0].fields[1]
    assert [field_value(code, n, 7) for n in range(3)] == ["seed", "sprout", None]


def test_required_self_reference_is_never_created(examples):
    text = intent_text("loops", "{}").replace(
        "{name: owner, type: ref, to: Member, required: true, on_delete: cascade}",
        "{name: parent, type: ref, to: Plant, required: true}")
    work = Workload(parse_intent_text(text))
    assert work.order == ["Member"]
    assert work.entities["Plant"].operations() == ["list"]


def test_load_test_on_a_generated_service(tmp_path: Path, rt: LocalRuntime, examples):
    intent = read_intent_file(examples / "loyalty-points.yaml")
    bundle = tmp_path / "bundle"
    write_bundle(bundle, render_service(intent))
    out = rt.deploy(service=intent.name, environment="staging", artifact="a" * 64, bundle_dir=bundle)
    assert out.ok, out.reason
    result = run_load_test(out.url, intent, duration_s=1.0, concurrency=2, seed=3)
    # Every request the workload sends is valid by the intent, so a correct service answers all of them.
    assert result.requests > 20 and result.errors == 0, result.error_examples
    assert {o.operation for o in result.operations} == {"create", "read", "list", "update"}
    assert result.p50_ms <= result.p95_ms <= result.p99_ms <= result.max_ms
    # Children were created against parents the test made first (PointsTransaction needs a Customer).
    txs = httpx.get(f"{out.url}/points_transactions", params={"limit": 500}, timeout=5).json()
    customers = {c["id"] for c in httpx.get(f"{out.url}/customers", params={"limit": 500}, timeout=5).json()["items"]}
    assert txs["total"] > 0 and {t["customer_id"] for t in txs["items"]} <= customers
    assert not evaluate_slo(result, p95_latency_ms=0.001, availability=99.9).met
    assert evaluate_slo(result, p95_latency_ms=10000, availability=99.9).met
    # A second test on the same data: unique values taken by the first answer 409, never an error.
    again = run_load_test(out.url, intent, duration_s=0.5, concurrency=2, seed=3)
    assert again.errors == 0, again.error_examples


def test_a_service_that_is_down_is_unavailable(examples):
    intent = read_intent_file(examples / "loyalty-points.yaml")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_load_test(f"http://127.0.0.1:{port}", intent, duration_s=0.3, concurrency=2, timeout_s=1)
    assert r.requests > 0 and r.errors == r.requests
    assert "availability 0.000% is below availability 99.9%" in evaluate_slo(
        r, p95_latency_ms=None, availability=99.9).detail
    with pytest.raises(ValueError, match="concurrency"):
        run_load_test(f"http://127.0.0.1:{port}", intent, duration_s=1, concurrency=0)


# ------------------------------------------------------------------------------------------ the gate


def test_gate_hold_comes_before_the_approval():
    kw = {"artifact": "a", "environments": ["dev", "staging", "production"], "require_approval": ["production"],
              "checks_passed": True, "approved": set(), "live": {"dev": "a", "staging": "a"}}
    hold = f"{GATE_PREFIX}SLO missed by a: p95 latency 9.00 ms exceeds p95_latency_ms 1 ms by 8.00 ms"
    d = next_step(failed={"production": hold}, **kw)
    assert (d.action, d.environment, d.reason) == ("slo_failed", "production", hold)
    assert next_step(failed={}, **kw).action == "await_approval"
    assert next_step(failed={"production": "unhealthy"}, **kw).action == "blocked"


def test_a_passing_retest_reopens_production(db, examples):
    from codemind_dagster.assets.deployments import _record_gate

    intent = read_intent_file(examples / "inventory-catalog.yaml")
    db.upsert_intent(intent.name, intent.content_hash, intent.canonical(), "x.yaml")
    a = "b" * 64
    db.add_release(intent.name, a, intent.content_hash, None)
    for env in ("dev", "staging"):
        db.request_promotion(intent.name, env, a)
        db.set_promotion(intent.name, env, a, "done")
        db.finish_deployment(db.start_deployment(intent.name, env, a, None), "live", url="u", pid=1)
    instance = dg.DagsterInstance.ephemeral()
    _record_gate(db, intent.name, "production", a, f"{GATE_PREFIX}SLO missed by {a[:12]}: p95 ...")
    assert promotion_requests(db, instance) == []
    _record_gate(db, intent.name, "production", a, None)
    [req] = promotion_requests(db, instance)
    assert (req.job_name, req.partition_key) == ("deploy_production", intent.name)
    # Once production runs it, a later miss in staging does not rewrite that history.
    db.set_promotion(intent.name, "production", a, "done")
    _record_gate(db, intent.name, "production", a, f"{GATE_PREFIX}SLO missed")
    assert next(p for p in db.promotions(intent.name) if p.environment == "production").status == "done"


@pytest.mark.slow
def test_demo_stops_an_unmeetable_slo_before_production(settings, runtime_cleanup, tmp_path, capsys):
    from codemind_dagster.demo import run_demo
    from codemind_dagster.instance import get_instance
    from codemind_dagster.resources.database import PlatformDB
    from codemind_dagster.status import platform_status

    intents = tmp_path / "intents"
    intents.mkdir()
    (intents / "slow.yaml").write_text(intent_text("unmeetable", "{p95_latency_ms: 1, availability: 99.9}"))
    (intents / "fast.yaml").write_text(intent_text("reachable", "{p95_latency_ms: 10000, availability: 99}"))
    s = settings.model_copy(update={"loadtest_duration_s": 1.0, "loadtest_concurrency": 2})
    assert run_demo(s, intents) == 1
    out = capsys.readouterr().out
    assert "unmeetable stopped before production: staging load test: SLO missed by" in out
    assert "exceeds p95_latency_ms 1 ms by" in out

    db = PlatformDB(s.db_url)
    doc = {i["name"]: i for i in platform_status(s, db, LocalRuntime(s.runtime_dir))["intents"]}
    held, ok = doc["unmeetable"], doc["reachable"]
    assert held["state"].startswith("held before production: staging load test: SLO missed by")
    assert held["gate"]["environment"] == "production" and "p95 latency" in held["gate"]["reason"]
    assert held["environments"]["staging"]["healthy"] and not held["environments"]["production"]["healthy"]
    assert ok["state"] == "live" and ok["gate"] is None and ok["environments"]["production"]["healthy"]
    assert not [p for p in db.promotions("unmeetable") if p.environment == "production" and p.run_id]

    # The figures are staging_deployment metadata per materialization, and the check records the verdict.
    instance = get_instance(s)
    try:
        [mat] = [e.asset_materialization for e in instance.fetch_materializations(
            dg.AssetKey("staging_deployment"), limit=10).records if e.asset_materialization.partition == "unmeetable"]
        p95 = mat.metadata["load_test_p95_ms"]
        assert isinstance(p95, dg.FloatMetadataValue) and p95.value > 1
        assert mat.metadata["load_test_slo_met"].value is False
        assert {r.data["operation"] for r in mat.metadata["load_test_operations"].records} == {
            "create", "read", "list", "update"}
        [run] = instance.get_runs(dg.RunsFilter(job_name="deploy_staging", tags={"dagster/partition": "unmeetable"}))
        [check] = [e.dagster_event.event_specific_data for e in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
        assert (check.check_name, check.passed) == ("load_test_meets_slo", False)
        assert run.status == dg.DagsterRunStatus.SUCCESS  # staging itself is live and healthy
    finally:
        instance.dispose()
