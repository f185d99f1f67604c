"""Prometheus: scrape targets from the runtime, the canary window read through PromQL, and the devservice."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.canary import WindowStats, parse_counters, quantile_ms
from codemind_dagster.domain.code import write_bundle
from codemind_dagster.domain.intent import parse_intent_text
from codemind_dagster.resources import canary_prometheus as cp
from codemind_dagster.resources.runtime import LocalRuntime
from codemind_dagster.resources.scrape_targets import (
    scrape_targets,
    sync_targets,
    targets_path,
    write_targets,
)
from devservices import prometheus as devprom
from devservices import servers
from tests.conftest import missing_component
from tests.test_fault_injection import SHOP


@pytest.fixture
def shop_bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    write_bundle(root, render_service(parse_intent_text(SHOP)))
    return root


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    """A real Prometheus on a free loopback port scraping every second, its files in a temp dir; stopped after."""
    try:
        devprom.binary()
    except devprom.PrometheusSetupError:
        missing_component("Debian's prometheus", devprom.SETUP_HINT)
    work = tmp_path_factory.mktemp("prometheus")
    server = devprom.start(work / "server", work / "targets.json")
    try:
        yield server
    finally:
        server.stop()
        assert server.proc.poll() is not None


def proxy_counters(metrics_url: str):
    return parse_counters(httpx.get(metrics_url, timeout=10, trust_env=False).text)


# ------------------------------------------------------------------------------------------ pure parts


def test_queries_quote_label_values_and_name_the_window():
    labels = cp.proxy_labels("shop", 'dev"\\x')
    assert cp.selector(labels) == '{job="codemind-proxy",service="shop",environment="dev\\"\\\\x"}'
    sel = '{job="codemind-proxy",service="a",environment="b"}'
    assert cp.samples_query(cp.REQUESTS, cp.proxy_labels("a", "b"), 312) == f"http_requests_total{sel}[312s]"
    assert cp.requests_increase_query(cp.proxy_labels("a", "b"), "30s") == (
        f"sum by (color, status) (increase(http_requests_total{sel}[30s]))")
    assert cp.p95_query(cp.proxy_labels("a", "b"), "1m") == (
        f"histogram_quantile(0.95, sum by (color, le) (rate(http_request_duration_seconds_bucket{sel}[1m])))")
    assert cp.range_for(100.0, 112.3) == 13 + cp.LOOKBACK_S
    assert cp.instance_of("http://127.0.0.1:41000/metrics") == "127.0.0.1:41000"
    with pytest.raises(ValueError, match="host and a port"):
        cp.instance_of("http://127.0.0.1/metrics")


def test_series_increase_starts_at_the_baseline_and_survives_resets():
    values = [(9.0, 5.0), (10.0, 7.0), (11.0, 9.0), (12.0, 2.0), (13.0, 4.0)]
    assert cp.series_increase(values, since=10.0) == 2 + 2 + 2  # 7 -> 9, restart counting 2, -> 4
    assert cp.series_increase(values, since=8.0) == 7 + 2 + 2 + 2  # created after `since`: from zero
    assert cp.series_increase(values, since=13.0) == 0
    assert cp.series_increase([], since=0.0) == 0


def test_window_stats_from_matrix_results():
    def series(values, **labels):
        return {"metric": labels, "values": [[t, str(v)] for t, v in values]}

    requests = [series([(1, 10), (3, 30)], color="blue", status="200"),
                series([(1, 1), (3, 4)], color="blue", status="503"),
                series([(2, 2)], color="green", status="none"),
                series([(1, 0), (3, 8)], color="green", status="404")]
    buckets = [series([(1, 0), (3, 20)], color="blue", le="0.005"),
               series([(1, 11), (3, 33)], color="blue", le="+Inf"),
               series([(3, 10)], color="green", le="0.005"), series([(3, 10)], color="green", le="+Inf")]
    stats = cp.window_stats(requests, buckets, since=1.5)
    assert stats["blue"] == WindowStats(23, 3, quantile_ms(0.95, {0.005: 20, math.inf: 22}))
    assert stats["green"] == WindowStats(10, 2, quantile_ms(0.95, {0.005: 10, math.inf: 10}))
    assert stats["blue"].p95_ms == 5.0  # above the last finite bound: its value, as Prometheus answers


def test_targets_are_written_only_when_they_change(tmp_path: Path):
    root = tmp_path / "runtime"
    env = root / "shop" / "dev"
    env.mkdir(parents=True)
    state = {"service": "shop", "environment": "dev", "port": 20001, "proxy": {"metrics_port": 41000},
             "live": {"port": 41001, "color": "blue", "artifact": "abc"}, "pending": None}
    (env / "state.json").write_text(json.dumps(state))
    (root / "shop" / "broken").mkdir()
    (root / "shop" / "broken" / "state.json").write_text("{half")  # skipped, not fatal
    out = tmp_path / "monitoring" / "targets.json"
    assert write_targets(root, out) and not write_targets(root, out)
    assert json.loads(out.read_text()) == scrape_targets(root) == [
        {"targets": ["127.0.0.1:41000"],
         "labels": {"job": "codemind-proxy", "service": "shop", "environment": "dev"}},
        {"targets": ["127.0.0.1:41001"], "labels": {"job": "codemind-service", "service": "shop",
                                                    "environment": "dev", "color": "blue", "version": "abc"}}]
    assert sorted(p.name for p in out.parent.iterdir()) == [".targets.json.lock", "targets.json"]  # no temp file
    home = tmp_path / "home"
    assert not sync_targets(root, home) and not targets_path(home).parent.exists()  # no monitoring dir: no-op
    targets_path(home).parent.mkdir(parents=True)
    assert sync_targets(root, home) and targets_path(home).is_file()
    out.unlink()
    assert sync_targets(root) and json.loads(out.read_text())  # home defaults to the runtime root's parent
    assert scrape_targets(tmp_path / "nowhere") == []


def test_a_missing_binary_names_the_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(devprom, "DEBIAN_BINARY", "/nonexistent/prometheus")
    with pytest.raises(devprom.PrometheusSetupError, match="apt-get install -y prometheus"):
        devprom.binary()


def test_an_unreachable_prometheus_is_named():
    url = f"http://127.0.0.1:{servers.free_port()}"
    with pytest.raises(cp.PrometheusError, match=f"Prometheus at {url} is unreachable .*make monitoring-up"):
        cp.PrometheusWindow(url, "shop", "dev").begin()


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.prometheus
def test_a_bad_query_names_the_query(prom):
    with pytest.raises(cp.PrometheusError, match=r"refused the query 'sum\(rate\(x\[1m\]\)': bad_data: .*paren"):
        cp.query(prom.url, "sum(rate(x[1m])")
    assert cp.query(prom.url, "vector(1)")["result"][0]["value"][1] == "1"


@pytest.mark.prometheus
def test_targets_prometheus_does_not_scrape_are_clear_errors(prom, tmp_path: Path):
    dead = servers.free_port()  # nothing listens there
    labels = {"job": "codemind-proxy", "service": "gone", "environment": "dev"}
    prom.targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{dead}"], "labels": labels}]))
    with pytest.raises(cp.PrometheusError, match=r"has not scraped the proxy target job=codemind-proxy service="
                                                 r"nowhere environment=dev within 1s: run `make monitoring-up`"):
        cp.PrometheusWindow(prom.url, "nowhere", "dev", scrape_wait_s=1).begin()
    with pytest.raises(cp.PrometheusError, match=f"fails to scrape the proxy target job=codemind-proxy "
                                                 f"service=gone environment=dev "
                                                 f"\\(http://127.0.0.1:{dead}/metrics: .*refused"):
        cp.PrometheusWindow(prom.url, "gone", "dev", scrape_wait_s=15).begin()


@pytest.mark.prometheus
@pytest.mark.slow
def test_window_figures_equal_the_proxys_own_counters(prom, rt: LocalRuntime, shop_bundle: Path):
    first = rt.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=shop_bundle)
    assert first.outcome == "deployed", first.reason
    status = rt.status("shop", "dev")
    state = json.loads((rt.root / "shop" / "dev" / "state.json").read_text())
    proxy_target = f"127.0.0.1:{state['proxy']['metrics_port']}"
    assert status.metrics_url == f"http://{proxy_target}/metrics"
    assert scrape_targets(rt.root) == [
        {"targets": [proxy_target], "labels": {"job": "codemind-proxy", "service": "shop", "environment": "dev"}},
        {"targets": [f"127.0.0.1:{state['live']['port']}"],
         "labels": {"job": "codemind-service", "service": "shop", "environment": "dev", "color": "blue",
                    "version": "v1"}}]
    assert write_targets(rt.root, prom.targets)

    window = cp.PrometheusWindow(prom.url, "shop", "dev", metrics_url=status.metrics_url)
    assert window.labels["instance"] == proxy_target
    t0 = time.monotonic()
    since = window.begin()  # waits for the first scrape of the new target (discovery batches for ~5 s)
    discovered_s = time.monotonic() - t0
    before = proxy_counters(status.metrics_url)
    with httpx.Client(base_url=status.url, timeout=10, trust_env=False) as c:
        for i in range(30):
            assert c.post("/customers", json={"email": f"a{i}@example.com"}).status_code == 201
        for _ in range(5):
            assert c.get("/customers/999999").status_code == 404
    # A second version with injected faults, so both colours and some 5xx are in the window.
    second = rt.deploy(service="shop", environment="dev", artifact="v2", bundle_dir=shop_bundle,
                       env={"CODEMIND_FAULT_ERROR_RATE": "0.3", "CODEMIND_FAULT_LATENCY_MS": "3"})
    assert second.outcome == "deployed", second.reason
    assert write_targets(rt.root, prom.targets)  # v2's process replaces v1's
    with httpx.Client(base_url=status.url, timeout=10, trust_env=False) as c:
        codes = [c.get("/customers", params={"limit": 1}).status_code for _ in range(40)]
    assert 500 in codes and 200 in codes
    t1 = time.monotonic()
    stats = window.stats(since)
    stats_s = time.monotonic() - t1
    after = proxy_counters(status.metrics_url)
    expected = {colour: c.minus(before.get(colour)) for colour, c in after.items()}
    # Quiet edges (no request between the baseline scrape and begin(), nor between stats() and its scrape):
    # the window is exact, to the request; only the p95's float arithmetic may differ.
    assert set(stats) == {"blue", "green"} == set(expected)
    for colour in stats:
        got, want = stats[colour], expected[colour]
        assert (got.requests, got.errors) == (want.requests, want.errors), colour
        assert got.p95_ms == pytest.approx(want.p95_ms, rel=1e-9), colour
    assert stats["blue"].requests >= 35 and stats["green"].requests >= 40
    assert stats["green"].errors == codes.count(500) and stats["blue"].errors == 0
    assert discovered_s < 15 and stats_s < 5, (discovered_s, stats_s)

    # Why the window does not use increase(): the proxy creates a series at its first request, so a version's
    # series are born inside the window with their first scrape's count, which increase() cannot see (it only
    # has differences between samples in its range), on top of extrapolating to the range's edges.
    span = cp.range_for(since, time.time())
    raw = cp.query(prom.url, cp.samples_query(cp.REQUESTS, window.labels, span))["result"]
    born = [s for s in raw if float(s["values"][0][0]) > since and float(s["values"][0][1]) > 0]
    assert {s["metric"]["color"] for s in born} >= {"green"}, raw

    # The service processes are scraped too, with their colour and version.
    active = httpx.get(f"{prom.url}/api/v1/targets", timeout=10, trust_env=False).json()["data"]["activeTargets"]
    deadline = time.monotonic() + 15
    while not any(t["labels"].get("version") == "v2" and t["health"] == "up" for t in active):
        assert time.monotonic() < deadline, active
        time.sleep(0.5)
        active = httpx.get(f"{prom.url}/api/v1/targets", timeout=10,
                           trust_env=False).json()["data"]["activeTargets"]
    [svc] = [t for t in active if t["labels"]["job"] == "codemind-service"]
    assert svc["labels"] | {} == {"instance": svc["labels"]["instance"], "job": "codemind-service",
                                  "service": "shop", "environment": "dev", "color": "green", "version": "v2"}


@pytest.mark.prometheus
@pytest.mark.slow
def test_the_canary_judged_through_promql_rolls_a_faulty_release_back(prom, rt: LocalRuntime, shop_bundle: Path):
    from codemind_dagster.domain.canary import AnalysisPolicy, parse_steps
    from codemind_dagster.resources.canary import CanaryRollout

    first = rt.deploy(service="shop", environment="production", artifact="v1", bundle_dir=shop_bundle)
    assert first.outcome == "deployed", first.reason
    assert write_targets(rt.root, prom.targets)
    windows = []

    def window(metrics_url: str):
        windows.append(cp.PrometheusWindow(prom.url, "shop", "production", metrics_url=metrics_url))
        return windows[-1]

    rollout = CanaryRollout(steps=parse_steps("10,100", 1.5), policy=AnalysisPolicy(), paths=("/customers",),
                            window=window)
    out = rt.deploy(service="shop", environment="production", artifact="v2", bundle_dir=shop_bundle,
                    env={"CODEMIND_FAULT_ERROR_RATE": "0.5"}, rollout=rollout)
    assert out.outcome == "rolled_back", out.reason
    assert "canary analysis of v2 at 10%: error rate" in out.reason
    [step] = out.canary
    assert len(windows) == 1 and step["source"] == "prometheus"
    assert 0.3 < step["canary_error_rate"] < 0.7 and step["stable_error_rate"] == 0
    assert step["canary_requests"] >= 20 and step["stable_requests"] > step["canary_requests"]
    assert rt.status("shop", "production").artifact == "v1"


@pytest.mark.prometheus
def test_devservice_up_status_down(codemind_home: Path, capsys):
    try:
        devprom.binary()
    except devprom.PrometheusSetupError:
        missing_component("Debian's prometheus", devprom.SETUP_HINT)
    url = devprom.up()
    try:
        pid, recorded = devprom.running()
        assert recorded == url and devprom.up() == url  # a second up reuses the running server
        assert httpx.get(f"{url}/-/ready", timeout=5, trust_env=False).status_code == 200
        assert json.loads(devprom.targets_path().read_text()) == []  # nothing deployed under this home yet
        assert devprom.targets_path() == targets_path(codemind_home.resolve())
        assert devprom.main(["status"]) == 0
        assert f"export CODEMIND_PROMETHEUS_URL={url}" in capsys.readouterr().out
        flags = " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
        assert "enable-admin-api" not in flags and "enable-lifecycle" not in flags and "127.0.0.1:" in flags
    finally:
        assert devprom.down()
    assert not servers.alive(pid)
    assert devprom.running() is None and devprom.main(["status"]) == 3


# ------------------------------------------------------------------------------------------ the dashboards

DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
# Grafana's built-ins, as it would expand them; an "All" selection of a variable is its allValue, `.*`.
PROM_BUILTINS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
# Metrics a healthy environment may lack: no backend ever refused a connection.
MAY_BE_EMPTY = ("codemind_proxy_backend_connect_errors_total",)


def dashboard_targets() -> list[tuple[str, str, dict]]:
    """(file, panel title, target) of every query of every dashboard, rows' panels included."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        stack = list(board["panels"])
        while stack:
            p = stack.pop(0)
            stack += p.get("panels", [])
            out += [(path.name, p["title"], t) for t in p.get("targets", [])]
    return out


def grafana_promql(expr: str, variables: dict[str, str]) -> str:
    for name, value in {**PROM_BUILTINS, **{f"${k}": v for k, v in variables.items()}}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def grafana_sql(query: str, start: str, end: str) -> str:
    """Grafana's PostgreSQL macros the dashboards use, expanded as Grafana does."""
    query = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN '{start}' AND '{end}'", query)
    assert "$" not in query, query
    return query


def test_dashboards_are_well_formed():
    boards = {p.name: json.loads(p.read_text()) for p in DASHBOARDS.glob("*.json")}
    assert set(boards) == {"delivery.json", "slos.json", "cost.json"}
    assert len({b["uid"] for b in boards.values()}) == 3
    sources = {"${prometheus}": "prometheus", "${platform_db}": "grafana-postgresql-datasource"}
    for name, board in boards.items():
        defined = {v["name"] for v in board["templating"]["list"]}
        for file, title, t in dashboard_targets():
            if file != name:
                continue
            ds = t["datasource"]
            assert sources.get(ds["uid"]) == ds["type"] and ds["uid"][2:-1] in defined, (file, title, ds)
            text = t.get("expr") or t.get("rawSql")
            assert text, (file, title)
            used = {w.strip("{}") for w in re.findall(r"\$(\w+)", text) if not w.startswith("__")}
            assert used <= defined, (file, title, used - defined)
    assert sum("expr" in t for *_, t in dashboard_targets()) >= 15
    assert sum("rawSql" in t for *_, t in dashboard_targets()) >= 9


@pytest.mark.prometheus
@pytest.mark.slow
def test_every_dashboard_promql_runs_on_the_real_prometheus(prom, rt: LocalRuntime, shop_bundle: Path):
    out = rt.deploy(service="shop", environment="staging", artifact="v1", bundle_dir=shop_bundle)
    assert out.outcome == "deployed", out.reason
    write_targets(rt.root, prom.targets)
    cp.PrometheusWindow(prom.url, "shop", "staging").begin()
    with httpx.Client(base_url=out.url, timeout=10, trust_env=False) as c:
        for i in range(20):
            c.post("/customers", json={"email": f"d{i}@example.com"})
            c.get("/customers", params={"limit": 1})
    # rate() needs two samples of each series after the traffic, the service's target its first scrape.
    deadline = time.monotonic() + 20
    while True:
        ups = cp.query(prom.url, 'up{service="shop",environment="staging"}')["result"]
        if len(ups) == 2 and all(u["value"][1] == "1" for u in ups):
            break
        assert time.monotonic() < deadline, ups
        time.sleep(0.5)
    time.sleep(2.5)
    variables = {"service": "shop", "environment": ".*"}
    ran = 0
    for file, title, t in dashboard_targets():
        if "expr" not in t:
            continue
        result = cp.query(prom.url, grafana_promql(t["expr"], variables))["result"]
        ran += 1
        if not any(m in t["expr"] for m in MAY_BE_EMPTY):
            assert result, f"{file}: {title}: {t['expr']} returned nothing for a service with traffic"
    assert ran >= 15
    # The template variables' label_values() become series lookups.
    for path in DASHBOARDS.glob("*.json"):
        for v in json.loads(path.read_text())["templating"]["list"]:
            if v["type"] != "query":
                continue
            inner = v["query"]["query"].removeprefix("label_values(").removesuffix(")")
            selector_part, label = (x.strip() for x in inner.rsplit(",", 1))
            r = httpx.get(f"{prom.url}/api/v1/series", trust_env=False, timeout=10,
                          params={"match[]": grafana_promql(selector_part, {"service": ".*"})}).json()
            assert r["status"] == "success" and any(s.get(label) for s in r["data"]), (path.name, v["name"])


@pytest.mark.postgres
def test_every_dashboard_sql_runs_on_the_platform_schema(fresh_pg_url: str):
    import sqlalchemy as sa

    from codemind_dagster.resources.budget_alerts import budget_states, record_alerts
    from codemind_dagster.resources.database import PlatformDB

    db = PlatformDB(fresh_pg_url)
    db.migrate()
    with_slo = parse_intent_text(SHOP + "  slo: {availability: 99.5, p95_latency_ms: 200}\n"
                                        "  budget: {llm_usd: 0.01}\n")
    plain = parse_intent_text(SHOP.replace("name: shop}", "name: plain}"))
    for intent in (with_slo, plain):
        db.upsert_intent(intent.name, intent.content_hash, intent.canonical(), f"{intent.name}.yaml")
    db.record_llm_call(intent="shop", run_id=None, task="coding", provider="offline", model="deterministic",
                       price_version="test", outcome="ok", cache_hit=False, cost_usd=0.02, input_tokens=100,
                       output_tokens=50)
    db.record_llm_call(intent=None, run_id=None, task="intent_draft", provider="offline", model="deterministic",
                       price_version="test", outcome="error", cache_hit=False, cost_usd=0)
    assert record_alerts(db, budget_states(db, daily_budget_usd=50.0))  # shop is over its $0.01
    start, end = "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z"
    engine = sa.create_engine(fresh_pg_url)
    ran = 0
    try:
        with engine.connect() as c:
            for file, title, t in dashboard_targets():
                if "rawSql" not in t:
                    continue
                rows = c.exec_driver_sql(grafana_sql(t["rawSql"], start, end)).mappings().all()
                ran += 1
                assert rows, f"{file}: {title}: no rows"
                if "availability_objective" in t["rawSql"]:
                    assert [dict(r) for r in rows] == [
                        {"service": "shop", "availability_objective": 99.5, "p95_objective_ms": 200.0}]
                if "budget_usd" in t["rawSql"] and "intents i" in t["rawSql"]:
                    by = {r["intent"]: r for r in rows}
                    assert by["shop"]["percent"] == pytest.approx(200.0) and by["plain"]["budget_usd"] is None
    finally:
        engine.dispose()
    assert ran >= 9


@pytest.mark.prometheus
def test_a_port_in_use_or_a_bad_port_is_a_clear_error(codemind_home: Path, monkeypatch):
    try:
        devprom.binary()
    except devprom.PrometheusSetupError:
        missing_component("Debian's prometheus", devprom.SETUP_HINT)
    monkeypatch.setenv(devprom.PORT_VAR, "http")
    with pytest.raises(devprom.PrometheusSetupError, match="CODEMIND_PROMETHEUS_PORT='http': expected a port"):
        devprom.up()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv(devprom.PORT_VAR, str(port))
        with pytest.raises(devprom.PrometheusSetupError, match=f"port {port} on 127.0.0.1 is in use"):
            devprom.up()
    assert devprom.running() is None
