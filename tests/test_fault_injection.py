"""Fault injection: a version deployed with CODEMIND_FAULT_* fails or delays a share of requests, on purpose."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.code import write_bundle
from codemind_dagster.domain.intent import parse_intent_text
from codemind_dagster.resources.runtime import DeployError, LocalRuntime
from codemind_dagster.resources.service_support import (
    ERROR_RATE_VAR,
    LATENCY_VAR,
    STATUS_VAR,
    FaultConfigError,
    FaultPlan,
    Faults,
    instrument,
    load_app,
)

SHOP = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: shop}
spec:
  summary: A shop with customers.
  entities:
    - name: Customer
      fields:
        - {name: email, type: string, required: true, unique: true, format: email}
"""

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.fullmatch(line) if line and not line.startswith("#") else None
        if m and m.group(1) == name:
            found = dict(LABEL.findall(m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


@pytest.fixture(scope="module")
def shop():
    return parse_intent_text(SHOP)


@pytest.fixture
def service_app(tmp_path: Path, shop):
    """create_app of the offline-generated shop service, imported from a bundle on disk."""
    root = tmp_path / "bundle"
    write_bundle(root, render_service(shop))
    sys.path.insert(0, str(root))
    try:
        from service.app import create_app

        yield create_app
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
            del sys.modules[name]


# ------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("env,message", [
    ({ERROR_RATE_VAR: "half"}, f"{ERROR_RATE_VAR} must be a number, got 'half'"),
    ({ERROR_RATE_VAR: "1.5"}, f"{ERROR_RATE_VAR} must be a share from 0 to 1, got 1.5"),
    ({ERROR_RATE_VAR: "-0.1"}, f"{ERROR_RATE_VAR} must be a share from 0 to 1"),
    ({ERROR_RATE_VAR: "nan"}, f"{ERROR_RATE_VAR} must be a finite number"),
    ({LATENCY_VAR: "-5"}, f"{LATENCY_VAR} must be milliseconds from 0 to 60000, got -5.0"),
    ({LATENCY_VAR: "inf"}, f"{LATENCY_VAR} must be a finite number"),
    ({ERROR_RATE_VAR: "0.5", STATUS_VAR: "404"}, f"{STATUS_VAR} must be a 5xx status, got 404"),
    ({ERROR_RATE_VAR: "0.5", STATUS_VAR: "5xx"}, f"{STATUS_VAR} must be an integer, got '5xx'"),
])
def test_bad_settings_are_refused_by_name(env: dict, message: str) -> None:
    with pytest.raises(FaultConfigError) as err:
        Faults.from_env(env)
    assert message in str(err.value)


def test_faults_only_when_asked_for() -> None:
    assert Faults.from_env({}) is None
    assert Faults.from_env({ERROR_RATE_VAR: "", LATENCY_VAR: " "}) is None
    assert Faults.from_env({ERROR_RATE_VAR: "0", LATENCY_VAR: "0"}) is None
    assert Faults.from_env({ERROR_RATE_VAR: "0.2", STATUS_VAR: "503"}) == Faults(error_rate=0.2, status=503)
    assert Faults.from_env({LATENCY_VAR: "250"}) == Faults(latency_ms=250.0)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.25, 0.29, 1 / 3, 0.5, 0.9, 1.0])
def test_the_error_share_is_exact_on_every_window(rate: float) -> None:
    plan = FaultPlan(Faults(error_rate=rate))
    outcomes = [plan.next_fails() for _ in range(1000)]
    assert sum(outcomes) == round(rate * 1000)
    # Spread evenly: any 100 consecutive requests hold the share, give or take one.
    for start in range(0, 900, 37):
        assert abs(sum(outcomes[start:start + 100]) - rate * 100) <= 1


def test_a_bad_setting_stops_the_service_before_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "service.app", raising=False)
    with pytest.raises(FaultConfigError, match=ERROR_RATE_VAR):
        load_app({ERROR_RATE_VAR: "lots"})
    assert "service.app" not in sys.modules


# ------------------------------------------------------------------------------------ in process


def test_injected_errors_fail_a_share_and_change_nothing(service_app) -> None:
    from fastapi.testclient import TestClient

    with TestClient(instrument(service_app(), Faults(error_rate=0.5))) as client:
        answers = [client.post("/customers", json={"email": f"c{i}@example.com"}) for i in range(10)]
        health = [client.get("/healthz").status_code for _ in range(5)]
        listed = client.get("/customers")
        text = client.get("/metrics").text
    failed = [a for a in answers if a.status_code == 500]
    assert len(failed) == 5 and all(a.status_code == 201 for a in answers if a not in failed)
    assert all(a.headers["x-codemind-fault"] == "error" and "injected fault" in a.json()["detail"] for a in failed)
    assert health == [200] * 5  # health and metrics are never faulted, so the version deploys
    assert listed.status_code == 200 and listed.json()["total"] == 5  # a failed create stored nothing
    assert value(text, "codemind_faults_injected_total", kind="error") == 5
    assert value(text, "codemind_fault_injection_config", setting="error_rate") == 0.5
    assert value(text, "http_requests_total", method="POST", route="/customers", status="500") == 5
    assert value(text, "http_requests_total", method="POST", route="/customers", status="201") == 5


def test_injected_status_and_latency(service_app) -> None:
    from fastapi.testclient import TestClient

    with TestClient(instrument(service_app(), Faults(error_rate=1.0, latency_ms=120, status=503))) as client:
        codes = [client.get("/customers").status_code for _ in range(3)]
        text = client.get("/metrics").text
    assert codes == [503] * 3
    assert value(text, "codemind_faults_injected_total", kind="latency") == 3
    # A lower bound only (each request slept at least 120 ms), so it cannot flake on a slow machine.
    assert value(text, "http_request_duration_seconds_sum", route="/customers") >= 0.36
    assert value(text, "http_request_duration_seconds_bucket", route="/customers", le="0.1") == 0


def test_no_faults_no_fault_metrics(service_app) -> None:
    from fastapi.testclient import TestClient

    with TestClient(instrument(service_app(), Faults())) as client:
        assert all(client.get("/customers").status_code == 200 for _ in range(5))
        text = client.get("/metrics").text
    assert "codemind_faults_injected_total" not in text and "codemind_fault_injection_config" not in text


# ------------------------------------------------------------------------------------ deployed






def test_a_faulty_release_deploys_fails_its_share_and_rolls_back(rt: LocalRuntime, tmp_path: Path, shop) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(bundle, render_service(shop))

    def deploy(artifact: str, **env: str):
        return rt.deploy(service="shop", environment="production", artifact=artifact, bundle_dir=bundle, env=env)

    assert deploy("v1").outcome == "deployed"
    url = rt.status("shop", "production").url
    assert httpx.post(f"{url}/customers", json={"email": "a@example.com"}, timeout=10).status_code == 201

    # A bad setting changes nothing: refused before anything starts, v1 keeps serving.
    with pytest.raises(DeployError, match=f"{ERROR_RATE_VAR} must be a share from 0 to 1"):
        deploy("v2", **{ERROR_RATE_VAR: "2"})
    assert rt.status("shop", "production").artifact == "v1"

    faulty = deploy("v2", **{ERROR_RATE_VAR: "0.25", LATENCY_VAR: "5"})
    assert faulty.outcome == "deployed", faulty.reason  # /healthz is exempt, so the health gate passes
    status = rt.status("shop", "production")
    assert status.artifact == "v2" and dict(status.faults) == {ERROR_RATE_VAR: "0.25", LATENCY_VAR: "5"}
    with httpx.Client(base_url=url, timeout=10) as client:
        codes = [client.get("/customers/1").status_code for _ in range(20)]
        service_text = client.get("/metrics").text
    assert codes.count(500) == 5 and codes.count(200) == 15
    assert value(service_text, "codemind_faults_injected_total", kind="error") == 5

    # The rollback path: the stable version back, and every request answered again.
    back = deploy("v1")
    assert back.outcome == "deployed" and back.previous_artifact == "v2", back.reason
    with httpx.Client(base_url=url, timeout=10) as client:
        assert [client.get("/customers/1").status_code for _ in range(10)] == [200] * 10
    proxy_text = httpx.get(rt.status("shop", "production").metrics_url, timeout=10).text
    by = {"method": "GET", "route": "/customers/{id}"}
    assert value(proxy_text, "http_requests_total", version="v2", status="500", **by) == 5
    assert value(proxy_text, "http_requests_total", version="v2", status="200", **by) == 15
    assert value(proxy_text, "http_requests_total", version="v1", status="200", **by) == 10
    assert value(proxy_text, "http_requests_total", version="v1", status="500") == 0


def test_the_same_artifact_with_other_faults_is_another_version(rt: LocalRuntime, tmp_path: Path, shop) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(bundle, render_service(shop))

    def deploy(**env: str):
        return rt.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle, env=env)

    assert deploy().outcome == "deployed"
    assert deploy().outcome == "unchanged"
    drill = deploy(**{ERROR_RATE_VAR: "1"})
    assert drill.outcome == "deployed", drill.reason
    url = rt.status("shop", "dev").url
    assert httpx.get(f"{url}/customers", timeout=10).status_code == 500
    assert deploy(**{ERROR_RATE_VAR: "1"}).outcome == "unchanged"
    assert deploy().outcome == "deployed"
    assert httpx.get(f"{url}/customers", timeout=10).status_code == 200
    assert rt.status("shop", "dev").faults == ()
