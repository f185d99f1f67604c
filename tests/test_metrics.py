"""GET /metrics: the platform layer in front of every service, and the proxy's metrics per backend version."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from codemind_dagster.agents.contract.suite import render_contract_suite
from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.code import write_bundle
from codemind_dagster.domain.intent import parse_intent_text
from codemind_dagster.resources import service_support
from codemind_dagster.resources.runtime import LocalRuntime
from codemind_dagster.resources.sandbox import SubprocessSandbox
from codemind_dagster.resources.service_support import instrument, path_template

REPO = Path(__file__).resolve().parents[1]
PROXY = REPO / "codemind_dagster" / "resources" / "proxy.py"

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
        - {name: points, type: integer, minimum: 0, default: 0}
"""

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = SAMPLE.fullmatch(line)
            assert m, f"not a Prometheus sample: {line!r}"
            out.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for n, lab, v in samples(text) if n == name and all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def shop():
    return parse_intent_text(SHOP)


@pytest.fixture
def shop_bundle(tmp_path: Path, shop) -> Path:
    root = tmp_path / "bundle"
    write_bundle(root, render_service(shop))
    return root






# ------------------------------------------------------------------------ the platform layer, in process


def test_generated_service_metrics_by_route_template_and_status(tmp_path: Path, shop) -> None:
    from fastapi.testclient import TestClient

    write_bundle(tmp_path / "b", render_service(shop))
    sys.path.insert(0, str(tmp_path / "b"))
    try:
        from service.app import create_app

        with TestClient(instrument(create_app())) as client:
            assert client.post("/customers", json={"email": "a@example.com"}).status_code == 201
            assert client.post("/customers", json={"email": "a@example.com"}).status_code == 409
            assert client.post("/customers", json={"email": "nope"}).status_code == 422
            assert client.get("/customers/1").status_code == 200
            assert client.get("/customers/2").status_code == 404
            assert client.get("/no/such/path").status_code == 404
            resp = client.get("/metrics")
    finally:
        sys.path.remove(str(tmp_path / "b"))
        for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
            del sys.modules[name]
    assert resp.status_code == 200
    assert resp.headers["content-type"] == service_support.CONTENT_TYPE
    text = resp.text
    for status, n in (("201", 1), ("409", 1), ("422", 1)):
        assert value(text, "http_requests_total", method="POST", route="/customers", status=status) == n
    assert value(text, "http_requests_total", method="GET", route="/customers/{id}", status="200") == 1
    assert value(text, "http_requests_total", method="GET", route="/customers/{id}", status="404") == 1
    assert value(text, "http_requests_total", route="unmatched", status="404") == 1
    assert value(text, "http_request_duration_seconds_count", method="GET", route="/customers/{id}") == 2
    assert value(text, "http_request_duration_seconds_bucket", method="POST", route="/customers", le="+Inf") == 3
    assert value(text, "http_requests_in_flight", method="GET") == 0
    assert value(text, "process_cpu_seconds_total") > 0
    assert value(text, "process_resident_memory_bytes") > 0
    assert "/metrics" not in {lab.get("route") for _, lab, _ in samples(text)}


def test_in_flight_counts_requests_not_yet_answered() -> None:
    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    layer = instrument(app)

    async def scenario() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=layer)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            waiting = [asyncio.create_task(client.get(f"/jobs/{i}")) for i in range(3)]
            while value(layer.render().decode(), "http_requests_in_flight", method="GET") < 3:
                await asyncio.sleep(0.01)
            during = (await client.get("/metrics")).text
            release.set()
            await asyncio.gather(*waiting)
            return during, (await client.get("/metrics")).text

    during, after = asyncio.run(scenario())
    assert value(during, "http_requests_in_flight", method="GET") == 3
    assert value(during, "http_requests_total") == 0
    assert value(after, "http_requests_in_flight", method="GET") == 0
    # No route table: ids in the path still become a template, so the label set stays bounded.
    assert value(after, "http_requests_total", method="GET", route="/jobs/{id}", status="200") == 3


def test_an_app_that_raises_is_counted_as_500() -> None:
    async def app(scope, receive, send):
        if scope["type"] == "http":
            raise RuntimeError("bug")

    layer = instrument(app)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=layer, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            assert (await client.get("/boom")).status_code == 500

    asyncio.run(scenario())
    text = layer.render().decode()
    assert value(text, "http_requests_total", route="/boom", status="500") == 1
    assert value(text, "http_requests_in_flight") == 0


def test_label_values_are_escaped_and_routes_are_bounded() -> None:
    metrics = service_support.RequestMetrics(("method", "route"))
    metrics.observe(("GET", 'a"b\\c\nd'), "200", 0.002)
    line = next(x for x in metrics.render(("method",)) if x.startswith("http_requests_total{"))
    assert line == 'http_requests_total{method="GET",route="a\\"b\\\\c\\nd",status="200"} 1'
    assert path_template("/a/12/b/0f8fad5b-d9cb-469f-a165-70867728950e/c") == "/a/{id}/b/{id}/c"

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    layer = instrument(app)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=layer), base_url="http://svc") as client:
            for i in range(service_support.MAX_ROUTES + 20):
                await client.get(f"/page-{i}")

    asyncio.run(scenario())
    routes = {lab["route"] for n, lab, _ in samples(layer.render().decode()) if n == "http_requests_total"}
    assert len(routes) == service_support.MAX_ROUTES + 1 and "other" in routes


def test_metrics_answers_only_get() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    with TestClient(instrument(FastAPI())) as client:
        resp = client.delete("/metrics")
        assert resp.status_code == 405 and resp.json()["detail"]
        assert client.head("/metrics").status_code == 200


# ------------------------------------------------------------------------ the contract suite checks it


def test_contract_suite_catches_a_broken_metrics_layer(tmp_path: Path, shop) -> None:
    """The suite's /metrics tests pass with the shipped layer and fail when it counts raw paths."""
    files = {**render_service(shop), **render_contract_suite(shop)}
    layer = files["contract_tests/codemind_service.py"]
    assert layer == (REPO / "codemind_dagster" / "resources" / "service_support.py").read_text()
    broken = layer.replace("    def route_of(self, scope: dict) -> str:\n",
                           "    def route_of(self, scope: dict) -> str:\n        return scope['path']\n")
    assert broken != layer
    outcomes = {}
    for name, text in (("good", layer), ("broken", broken)):
        work = tmp_path / name
        write_bundle(work, {**files, "contract_tests/codemind_service.py": text})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "contract_tests",
               "-k", "metrics", "--junitxml=report.xml"]
        result = SubprocessSandbox(tmp_path, timeout_s=120).run(cmd, workdir=work)
        outcomes[name] = (result.returncode, result.stdout)
    assert outcomes["good"][0] == 0, outcomes["good"][1][-3000:]
    assert outcomes["broken"][0] == 1, outcomes["broken"][1][-3000:]
    assert "ids leaked into route labels" in outcomes["broken"][1] or "route template" in outcomes["broken"][1]


# ------------------------------------------------------------------------ deployed: service and proxy


def test_every_deployed_service_serves_metrics_and_the_proxy_counts_per_version(rt: LocalRuntime,
                                                                               shop_bundle: Path,
                                                                               tmp_path: Path) -> None:
    # A hand-written app, as a model might write it: no /metrics of its own.
    other = tmp_path / "other"
    (other / "service").mkdir(parents=True)
    (other / "service" / "app.py").write_text(
        "from fastapi import FastAPI\napp = FastAPI()\n\n\n@app.get('/healthz')\ndef healthz():\n"
        "    return {'status': 'ok'}\n\n\n@app.get('/customers/{cid}')\ndef customer(cid: int):\n"
        "    return {'id': cid}\n")
    first = rt.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=shop_bundle)
    assert first.outcome == "deployed", first.reason
    status = rt.status("shop", "dev")
    assert status.metrics_url and status.metrics_url != f"{status.url}/metrics"
    with httpx.Client(base_url=status.url, timeout=10) as client:  # one keep-alive connection
        assert client.post("/customers", json={"email": "a@example.com"}).status_code == 201
        for _ in range(3):
            assert client.get("/customers/1").status_code == 200
        assert client.get("/customers/99").status_code == 404
        assert client.head("/healthz").status_code in (200, 405)
        service_text = client.get("/metrics").text
    assert value(service_text, "http_requests_total", method="GET", route="/customers/{id}", status="200") == 3
    assert value(service_text, "http_requests_total", method="POST", route="/customers", status="201") == 1

    second = rt.deploy(service="shop", environment="dev", artifact="v2", bundle_dir=other)
    assert second.outcome == "deployed", second.reason
    with httpx.Client(base_url=status.url, timeout=10) as client:
        for i in range(2):
            assert client.get(f"/customers/{i}").json() == {"id": i}
        assert value(client.get("/metrics").text, "http_requests_total", method="GET",
                     route="/customers/{cid}", status="200") == 2

    proxy_text = httpx.get(rt.status("shop", "dev").metrics_url, timeout=10).text
    v1 = {"version": "v1", "route": "/customers/{id}", "method": "GET"}
    assert value(proxy_text, "http_requests_total", **v1, status="200") == 3
    assert value(proxy_text, "http_requests_total", **v1, status="404") == 1
    assert value(proxy_text, "http_requests_total", version="v1", method="POST", route="/customers",
                 status="201") == 1
    assert value(proxy_text, "http_requests_total", version="v2", method="GET", route="/customers/{id}",
                 status="200") == 2
    assert value(proxy_text, "http_request_duration_seconds_count", **v1) == 4
    assert value(proxy_text, "http_requests_in_flight") == 0
    assert value(proxy_text, "codemind_proxy_target_info", version="v2") == 1
    assert value(proxy_text, "codemind_proxy_target_info", version="v1") == 0
    assert value(proxy_text, "process_cpu_seconds_total") > 0
    colors = {lab["version"]: lab["color"] for n, lab, _ in samples(proxy_text) if n == "http_requests_total"}
    assert colors == {"v1": "blue", "v2": "green"}


# ------------------------------------------------------------------------ the proxy's HTTP reading


class Backend(BaseHTTPRequestHandler):
    """Answers with every framing the proxy must follow: lengths, chunks, HEAD, 204, 100, close-delimited."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif self.path.startswith("/close"):
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif self.path.startswith("/empty"):
            self.send_response(204)
            self.end_headers()
        else:
            self.answer(b"plain", 503 if self.path.startswith("/fail") else 200)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_POST(self) -> None:
        if self.path == "/hangup":  # read the request, then close without an answer
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.close_connection = True
            return
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip(), 16)) != 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(body, 201)

    def answer(self, body: bytes, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A proxy process in front of the framing backend: (public port, metrics port)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = tmp_path / "target"
    target.write_text(f"127.0.0.1:{server.server_port} v7 blue\n")
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-I", str(PROXY), "--listen", f"127.0.0.1:{port}",
                             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--target-file", str(target)],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the proxy never served /metrics"
                time.sleep(0.05)
        yield port, metrics_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
        server.shutdown()
        server.server_close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on one connection, half-close, read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_proxy_follows_http_framing_per_request(proxy) -> None:
    port, metrics_port = proxy
    # Pipelined on one connection: a chunked answer, HEAD with a length and no body, 204, a chunked and a
    # sized upload, a failure, and finally an answer delimited by the close.
    pipelined = (b"GET /chunked/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"HEAD /items/5 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                 b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz"
                 b"GET /fail/12?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = raw_exchange(port, pipelined)
    assert answer.count(b"HTTP/1.1 ") == 7 and answer.endswith(b"until the end")
    assert b"hello chunked world" not in answer and b"abcde" in answer and b"wxyz" in answer
    # Requests split across writes still read as one each.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in (b"POST /items HT", b"TP/1.1\r\nContent-Le", b"ngth: 6\r\n\r\nab", b"cdef"):
            sock.sendall(piece)
            time.sleep(0.01)
        got = b""
        # The head and the body may arrive in separate reads when the machine is busy.
        while not got.endswith(b"abcdef") and (chunk := sock.recv(65536)):
            got += chunk
        assert got.startswith(b"HTTP/1.1 ") and got.endswith(b"abcdef")

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    expected = [("GET", "/chunked/{id}", "200"), ("HEAD", "/items/{id}", "200"), ("GET", "/empty", "204"),
                ("POST", "/items", "201"), ("GET", "/fail/{id}", "503"), ("GET", "/close", "200")]
    for method, route, status in expected:
        got = value(text, "http_requests_total", version="v7", color="blue", method=method, route=route,
                    status=status)
        assert got == (3 if (method, route) == ("POST", "/items") else 1), (method, route, status, text)
    assert value(text, "http_requests_total") == 8
    assert value(text, "http_request_duration_seconds_count") == 8
    assert value(text, "http_requests_in_flight") == 0
    assert value(text, "codemind_proxy_connections_total", version="v7") == 2
    assert value(text, "codemind_proxy_target_info", version="v7", color="blue") == 1
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/other", timeout=10).status_code == 404
    assert httpx.post(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 405


def test_proxy_counts_unanswered_requests_and_forwards_what_it_cannot_read(proxy, tmp_path: Path) -> None:
    port, metrics_port = proxy
    # Not HTTP at all: forwarded untouched (the backend answers 400 and closes), not counted.
    garbage = raw_exchange(port, b"\x00\x01 hello\r\n\r\n")
    assert b"400" in garbage
    # A request the backend never answers: counted with status "none".
    assert raw_exchange(port, b"POST /hangup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi") == b""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        if value(text, "http_requests_total", status="none") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(text, "http_requests_total", method="POST", route="/hangup", status="none") == 1
    assert value(text, "http_request_duration_seconds_count") == 0  # no answer, no latency
    assert value(text, "http_requests_in_flight") == 0
    assert value(text, "http_requests_total") == 1


def test_proxy_target_file_with_and_without_a_version(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("proxy_under_test", PROXY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = tmp_path / "target"
    target.write_text("127.0.0.1:8080\n")  # as written before versions were recorded
    assert module.read_target(str(target)) == (module.Weighted(module.Backend("127.0.0.1", 8080, "", ""), 100),)
    target.write_text("127.0.0.1:8081 abc123 green\n")
    assert module.read_target(str(target)) == (
        module.Weighted(module.Backend("127.0.0.1", 8081, "abc123", "green"), 100),)
    target.write_text("")
    assert module.read_target(str(target)) == ()
    target.write_text("no-port-here\n")
    assert module.read_target(str(target)) == ()


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    metrics = service_support.RequestMetrics(("method", "route"))
    for seconds in (0.001, 0.0011, 0.2, 20.0):
        metrics.observe(("GET", "/x"), "200", seconds)
    metrics.observe(("GET", "/x"), "none", None)  # never answered: counted, not timed
    text = "\n".join(metrics.render(("method",)))
    assert value(text, "http_request_duration_seconds_bucket", le="0.001") == 1
    assert value(text, "http_request_duration_seconds_bucket", le="0.0025") == 2
    assert value(text, "http_request_duration_seconds_bucket", le="0.2") == 3
    assert value(text, "http_request_duration_seconds_bucket", le="10.0") == 3
    assert value(text, "http_request_duration_seconds_bucket", le="+Inf") == 4
    assert value(text, "http_request_duration_seconds_count") == 4
    assert value(text, "http_requests_total", status="none") == 1


def test_a_proxy_from_before_metrics_is_replaced_on_the_next_deploy(rt: LocalRuntime, shop_bundle: Path) -> None:
    assert rt.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=shop_bundle).ok
    state_file = rt.root / "shop" / "dev" / "state.json"
    state = json.loads(state_file.read_text())
    old_pid = state["proxy"]["pid"]
    del state["proxy"]["metrics_port"]  # as an older runtime recorded it
    state_file.write_text(json.dumps(state))
    out = rt.deploy(service="shop", environment="dev", artifact="v2", bundle_dir=shop_bundle)
    assert out.outcome == "deployed", out.reason
    status = rt.status("shop", "dev")
    assert status.proxy_pid != old_pid
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert status.healthy and status.url == out.url
    assert value(httpx.get(status.metrics_url, timeout=10).text, "codemind_proxy_target_info", version="v2") == 1


def test_a_bundle_file_named_like_the_layer_does_not_replace_it(rt: LocalRuntime, shop_bundle: Path) -> None:
    (shop_bundle / "codemind_service.py").write_text("app = None  # a model's file of the same name\n")
    assert rt.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=shop_bundle).ok
    text = httpx.get(f"{rt.status('shop', 'dev').url}/metrics", timeout=10).text
    assert "http_requests_total" in text


def test_proxy_stops_on_sigterm_even_when_its_parent_ignored_it(tmp_path: Path) -> None:
    """An ignored SIGTERM is inherited across exec; the proxy must still stop when the runtime asks."""
    import signal

    target = tmp_path / "target"
    target.write_text("127.0.0.1:9 v1 blue\n")
    argv = [sys.executable, "-I", str(PROXY), "--listen", f"127.0.0.1:{free_port()}", "--target-file", str(target)]
    ignore_then_exec = "import os, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", ignore_then_exec, *argv], stderr=subprocess.PIPE)
    try:
        assert b"listening on" in proc.stderr.readline()
        proc.terminate()
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
