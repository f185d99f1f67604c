"""The production canary: weighted traffic through the proxy, an analysis at each step, rollback to stable."""

from __future__ import annotations

import importlib.util
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from codemind_dagster.domain.canary import (
    AnalysisPolicy,
    CanaryStep,
    StepAnalysis,
    WindowStats,
    analyze,
    parse_counters,
    parse_steps,
    quantile_ms,
)
from codemind_dagster.resources.canary import CanaryRollout, ProxyWindow
from codemind_dagster.resources.runtime import LocalRuntime
from codemind_dagster.resources.service_support import ERROR_RATE_VAR, LATENCY_VAR

PROXY = Path(__file__).resolve().parents[1] / "codemind_dagster" / "resources" / "proxy.py"


def proxy_module():
    spec = importlib.util.spec_from_file_location("proxy_under_test", PROXY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy(rt: LocalRuntime, name: str, bundle_dir: Path, **kw):
    return rt.deploy(service="shop", environment="production", artifact=name, bundle_dir=bundle_dir, **kw)


def answered_by(url: str) -> str:
    """Which version answered one request on a connection of its own."""
    return httpx.get(f"{url}/version", timeout=5, headers={"connection": "close"}).json()["version"]


# ---- steps and the analysis, pure --------------------------------------------------------------------


def test_steps_parse_and_bad_steps_are_refused() -> None:
    assert parse_steps("10, 50,100", 2.0) == (CanaryStep(10, 2.0), CanaryStep(50, 2.0), CanaryStep(100, 2.0))
    assert parse_steps("100", 0) == (CanaryStep(100, 0),)
    for bad in ("", "10,50", "50,10,100", "10,10,100", "ten,100", "0,100", "10,150"):
        with pytest.raises(ValueError, match="canary"):
            parse_steps(bad, 1.0)
    with pytest.raises(ValueError, match="pause"):
        CanaryStep(10, -1.0)


def test_a_canary_failing_more_than_stable_fails_with_the_figures() -> None:
    policy = AnalysisPolicy()
    bad = analyze(10, WindowStats(50, 25, 2.0), WindowStats(450, 0, 2.0), policy)
    assert not bad.passed
    assert "error rate 50.00% (25 of 50) exceeds stable's 0.00% by 50.00%" in bad.detail
    assert bad.served_percent == 10.0
    assert bad.row()["canary_error_rate"] == 0.5 and bad.row()["stable_requests"] == 450
    # Within one point of stable's own failures: not the canary's fault.
    assert analyze(10, WindowStats(100, 3, 2.0), WindowStats(900, 20, 2.0), policy).passed


def test_latency_too_few_requests_and_the_slo_each_fail_a_step() -> None:
    policy = AnalysisPolicy(min_requests=20)
    slow = analyze(50, WindowStats(100, 0, 60.0), WindowStats(100, 0, 3.0), policy)
    assert not slow.passed and "p95 60.00 ms exceeds stable's 3.00 ms x1.5 + 5 ms = 9.50 ms" in slow.detail
    few = analyze(10, WindowStats(5, 0, 1.0), WindowStats(500, 0, 1.0), policy)
    assert not few.passed and "only 5 requests reached the canary" in few.detail
    slo = analyze(100, WindowStats(200, 1, 30.0), None, policy, p95_latency_ms=20, availability=99.9)
    assert not slo.passed
    assert "availability 99.500% is below the slo's 99.9%" in slo.detail
    assert "p95 30.00 ms exceeds the slo's p95_latency_ms 20 ms" in slo.detail
    assert analyze(100, WindowStats(200, 0, 3.0), None, policy, p95_latency_ms=20, availability=99.9).passed


def test_counters_and_quantiles_read_as_prometheus_would() -> None:
    text = (
        'http_requests_total{version="a",color="blue",method="GET",route="/x",status="200"} 90\n'
        'http_requests_total{version="a",color="blue",method="GET",route="/y",status="503"} 5\n'
        'http_requests_total{version="a",color="blue",method="POST",route="/y",status="none"} 5\n'
        'http_requests_total{version="b",color="green",method="GET",route="/x",status="404"} 7\n'
        'http_request_duration_seconds_bucket{version="a",color="blue",method="GET",route="/x",le="0.001"} 50\n'
        'http_request_duration_seconds_bucket{version="a",color="blue",method="GET",route="/x",le="0.01"} 95\n'
        'http_request_duration_seconds_bucket{version="a",color="blue",method="GET",route="/x",le="+Inf"} 95\n'
        'codemind_proxy_connections_total{version="a",color="blue"} 100\n'
    )
    counters = parse_counters(text)
    assert counters["blue"].requests == 100 and counters["blue"].errors == 10  # 5xx and no answer
    assert counters["green"].requests == 7 and counters["green"].errors == 0  # a 404 is the contract's answer
    window = counters["blue"].minus(None)
    assert window.p95_ms == pytest.approx(1 + 9 * (90.25 - 50) / 45)  # rank 90.25 of 95, linear in (1, 10] ms
    assert quantile_ms(0.5, {0.001: 50, 0.01: 100, float("inf"): 100}) == pytest.approx(1.0)
    assert quantile_ms(0.95, {0.001: 0, float("inf"): 0}) is None


def test_weights_split_connections_exactly(tmp_path: Path) -> None:
    proxy = proxy_module()
    target = tmp_path / "target"
    target.write_text("127.0.0.1:8001 v1 blue 90\n127.0.0.1:8002 v2 green 10\n")
    targets = proxy.read_target(str(target))
    assert [(t.backend.version, t.weight) for t in targets] == [("v1", 90), ("v2", 10)]
    picker = proxy.Picker(targets)
    picks = [picker.pick().version for _ in range(100)]
    assert Counter(picks) == {"v1": 90, "v2": 10}
    # Smooth: the ten canary connections are spread out, one in every ten, not ten in a row.
    assert all(Counter(picks[i:i + 10])["v2"] == 1 for i in range(0, 100, 10))
    target.write_text("127.0.0.1:8001 v1 blue 0\n127.0.0.1:8002 v2 green 100\n")
    assert {proxy.Picker(proxy.read_target(str(target))).pick().version for _ in range(5)} == {"v2"}
    target.write_text("127.0.0.1:8001 v1 blue -5\n")
    assert proxy.read_target(str(target)) == ()  # a hand edit the proxy cannot read routes nowhere


# ---- the runtime, for real --------------------------------------------------------------------------


class CountingRollout:
    """A caller's analysis that counts, per step, which version answered 100 requests through the URL."""

    def __init__(self, weights: tuple[int, ...], rt: LocalRuntime | None = None) -> None:
        self.steps = tuple(CanaryStep(w, 0) for w in weights)
        self.answers: list[Counter] = []
        self.rt, self.shown = rt, []

    def analyze(self, step: CanaryStep, *, url: str, metrics_url: str, stable: str, canary: str) -> StepAnalysis:
        self.answers.append(Counter(answered_by(url) for _ in range(100)))
        if self.rt is not None:  # what `codemind status` shows meanwhile
            self.shown.append(self.rt.status("shop", "production").rollout)
        return StepAnalysis(step.weight, True, WindowStats(1, 0, None), None, None, [], "test")


def test_the_weights_served_are_the_weights_asked(rt: LocalRuntime, bundle) -> None:
    """Counted at the client: of 100 connections at each step, exactly the step's share reached v2."""
    assert deploy(rt, "v1", bundle("v1")).outcome == "deployed"
    rollout = CountingRollout((10, 50, 100), rt)
    outcome = deploy(rt, "v2", bundle("v2"), rollout=rollout)
    assert outcome.outcome == "deployed", outcome.reason
    assert rollout.answers == [{"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 100}]
    assert rollout.shown == ["canary 10% of v2", "canary 50% of v2", "canary 100% of v2"]
    assert rt.status("shop", "production").rollout is None
    assert [r["weight"] for r in outcome.canary] == [10, 50, 100]
    assert "after a canary of 3 steps (10%, 50%, 100%)" in outcome.reason
    assert {answered_by(outcome.url) for _ in range(10)} == {"v2"}


def test_a_release_failing_requests_is_rolled_back_in_its_canary_and_stable_kept_serving(
        rt: LocalRuntime, bundle) -> None:
    assert deploy(rt, "v1", bundle("v1")).outcome == "deployed"
    url = rt.status("shop", "production").url
    seen: list[tuple[int, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def user() -> None:
        # A user of the environment's URL throughout the canary and its rollback, one connection per request.
        while not stop.is_set():
            try:
                r = httpx.get(f"{url}/version", timeout=5, headers={"connection": "close"})
                seen.append((r.status_code, r.json().get("version") or r.headers.get("x-codemind-fault", "?")))
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    users = [threading.Thread(target=user) for _ in range(2)]
    for t in users:
        t.start()
    try:
        rollout = CanaryRollout(steps=parse_steps("10,50,100", 1.0), policy=AnalysisPolicy(), paths=("/version",))
        outcome = deploy(rt, "v2", bundle("v2"), env={ERROR_RATE_VAR: "0.5"}, rollout=rollout)
        after = len(seen)
        for _ in range(20):
            answered_by(url)
    finally:
        stop.set()
        for t in users:
            t.join(10)
    assert outcome.outcome == "rolled_back", outcome.reason
    assert "v2 rolled back: canary analysis of v2 at 10%: error rate" in outcome.reason
    assert "v1 keeps serving" in outcome.reason
    [step] = outcome.canary
    assert step["weight"] == 10 and not step["passed"] and step["source"] == "proxy"
    assert 0.3 < step["canary_error_rate"] < 0.7 and step["stable_error_rate"] == 0
    assert 5 < step["served_percent"] < 15  # the synthetic traffic and the users' both split 90/10
    # No request failed for the rollback: every failure is one the canary injected, and none lost its connection.
    assert errors == []
    assert {v for code, v in seen if code != 200} <= {"error"}
    assert {v for code, v in seen if code == 200} <= {"v1", "v2"}
    assert {v for _, v in seen[after:]} == {"v1"}  # back on stable
    status = rt.status("shop", "production")
    assert status.artifact == "v1" and status.healthy


def test_a_slow_release_is_rolled_back_on_p95(rt: LocalRuntime, bundle) -> None:
    assert deploy(rt, "v1", bundle("v1")).outcome == "deployed"
    rollout = CanaryRollout(steps=parse_steps("50,100", 1.0), policy=AnalysisPolicy(), paths=("/version",))
    outcome = deploy(rt, "v2", bundle("v2"), env={LATENCY_VAR: "60"}, rollout=rollout)
    assert outcome.outcome == "rolled_back", outcome.reason
    assert "canary analysis of v2 at 50%: p95" in outcome.reason and "exceeds stable's" in outcome.reason
    assert outcome.canary[0]["canary_p95_ms"] >= 50


def test_a_healthy_release_walks_every_step(rt: LocalRuntime, bundle) -> None:
    assert deploy(rt, "v1", bundle("v1")).outcome == "deployed"
    rollout = CanaryRollout(steps=parse_steps("20,100", 0.5), policy=AnalysisPolicy(), paths=("/version",))
    outcome = deploy(rt, "v2", bundle("v2"), rollout=rollout)
    assert outcome.outcome == "deployed", outcome.reason
    first, last = outcome.canary
    assert first["passed"] and last["passed"]
    assert 15 < first["served_percent"] < 25 and last["served_percent"] == 100
    assert last["stable_requests"] > 0  # the last step compares with the baseline of the step before
    assert answered_by(outcome.url) == "v2"


def test_a_canary_nobody_can_judge_is_not_let_through(rt: LocalRuntime, bundle) -> None:
    assert deploy(rt, "v1", bundle("v1")).outcome == "deployed"
    unreachable = CanaryRollout(steps=parse_steps("100", 0), policy=AnalysisPolicy(), paths=("/version",),
                                window=lambda _url: ProxyWindow("http://127.0.0.1:9/metrics", timeout_s=0.5))
    outcome = deploy(rt, "v2", bundle("v2"), rollout=unreachable)
    assert outcome.outcome == "rolled_back"
    assert "canary analysis at 100% could not run" in outcome.reason and "127.0.0.1:9" in outcome.reason
    assert answered_by(outcome.url) == "v1"


def test_the_first_release_has_no_canary(rt: LocalRuntime, bundle) -> None:
    """Nothing stable to compare with: the first version is cut over as before, without analysis."""
    rollout = CountingRollout((10, 100))
    outcome = deploy(rt, "v1", bundle("v1"), rollout=rollout)
    assert outcome.outcome == "deployed" and outcome.canary == () and rollout.answers == []


# ---- through Dagster: production_deployment ----------------------------------------------------------


@pytest.mark.slow
def test_a_fault_drill_in_production_is_rolled_back_and_recorded(settings, runtime_cleanup, examples) -> None:
    import dagster as dg

    from codemind_dagster.driver import Driver

    driver = Driver(settings.model_copy(update={"canary_pause_s": 1.0}), progress=lambda m: None)
    try:
        driver.defs.resources["intent_store"].store().submit(examples / "inventory-catalog.yaml")
        assert all(o.success for o in driver.run_until_idle())
        db = driver.defs.resources["database"].client()
        name = "inventory-catalog"
        live = db.live_deployments(name)[(name, "production")]
        job = driver.defs.resolve_job_def("deploy_production")

        bad_tag = job.execute_in_process(instance=driver.instance, partition_key=name, raise_on_error=False,
                                         tags={"codemind/faults": "error_rate=lots"})
        assert not bad_tag.success
        assert "error_rate" in str(bad_tag.failure_data_for_node("production_deployment").error.message)
        assert len(db.deployment_history(name)) == 3  # refused before anything was deployed

        drill = job.execute_in_process(instance=driver.instance, partition_key=name, raise_on_error=False,
                                       tags={"codemind/faults": "error_rate=0.5"})
        assert not drill.success
        last = db.deployment_history(name)[-1]
        assert last.status == "rolled_back" and last.environment == "production"
        assert "rolled back: canary analysis of " in last.detail and " at 10%: error rate" in last.detail
        failure = next(e for e in drill.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        steps = failure.step_failure_data.user_failure_data.metadata["canary_steps"]
        assert [r.data["weight"] for r in steps.records] == [10] and steps.records[0].data["passed"] is False
        # Production still runs the release it had, without faults, and its promotion is untouched.
        status = driver.defs.resources["runtime"].runtime().status(name, "production")
        assert status.artifact == live.artifact and status.healthy and status.faults == ()
        assert db.live_deployments(name)[(name, "production")].id == live.id
        assert next(p for p in db.promotions(name) if p.environment == "production").status == "done"
    finally:
        driver.instance.dispose()
