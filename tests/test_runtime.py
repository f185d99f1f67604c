"""Tests of the local deploy target: blue/green cutover, rollback, crash recovery and process hygiene."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from codemind_dagster.resources import runtime as runtime_module
from codemind_dagster.resources.runtime import DeployError, LocalRuntime
from tests.runtime_procs import ours

REPO = Path(__file__).resolve().parents[1]


BROKEN = """
from fastapi import FastAPI
from fastapi.responses import JSONResponse

print("%(version)s: health check is wired to fail", flush=True)
app = FastAPI()

@app.get("/healthz")
def healthz():
    return JSONResponse({"status": "broken"}, status_code=500)
"""

CRASHES = """
raise RuntimeError("boom: %(version)s cannot start")
"""

HANGS = """
import time

time.sleep(3600)
app = None
"""

# Stands in for a deployer killed between starting the new version and cutting over to it.
DIE_BEFORE_CUTOVER = """
import os, sys
from pathlib import Path
from codemind_dagster.resources.runtime import LocalRuntime

LocalRuntime._cut_over = lambda *a, **k: os._exit(3)
rt = LocalRuntime(Path(sys.argv[1]), health_timeout_s=30)
rt.deploy(service="shop", environment="dev", artifact=sys.argv[2], bundle_dir=Path(sys.argv[3]))
"""

DEPLOY_AND_EXIT = """
import dataclasses, json, sys
from pathlib import Path
from codemind_dagster.resources.runtime import LocalRuntime

rt = LocalRuntime(Path(sys.argv[1]), health_timeout_s=30)
outcome = rt.deploy(service="shop", environment="dev", artifact=sys.argv[2], bundle_dir=Path(sys.argv[3]))
print(json.dumps(dataclasses.asdict(outcome)))
"""


def gone(pid: int, within_s: float = 5.0) -> bool:
    """The process no longer runs (a zombie waiting for a reaper that is not ours counts as gone)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)




def version(url: str) -> str:
    return httpx.get(f"{url}/version", timeout=5).json()["version"]


def state(rt: LocalRuntime, env: str = "dev") -> dict:
    return json.loads((rt.root / "shop" / env / "state.json").read_text())






def deploy(rt: LocalRuntime, artifact: str, bundle_dir: Path, env: str = "dev"):
    return rt.deploy(service="shop", environment=env, artifact=artifact, bundle_dir=bundle_dir)


def run_script(source: str, *args: object) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", source, *map(str, args)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_first_deploy_serves_the_bundle(rt: LocalRuntime, bundle) -> None:
    out = deploy(rt, "v1", bundle("v1"))
    assert out.outcome == "deployed" and out.ok
    assert out.previous_artifact is None
    assert version(out.url) == "v1"
    body = httpx.get(f"{out.url}/version", timeout=5).json()
    assert body["data_dir"] == str(rt.root / "shop" / "dev" / "data")
    st = rt.status("shop", "dev")
    assert st is not None and st.healthy
    assert (st.url, st.artifact, st.pid) == (out.url, "v1", out.pid)
    assert st.proxy_pid and st.memory_rss_bytes and st.memory_rss_bytes > 0 and st.uptime_s >= 0
    assert st.started_at
    assert [s.environment for s in rt.list()] == ["dev"]
    lo, hi = runtime_module.PUBLIC_PORTS
    assert lo <= st.port <= hi < 32768


def test_new_version_takes_the_same_url_and_old_process_stops(rt: LocalRuntime, bundle) -> None:
    v1 = deploy(rt, "v1", bundle("v1"))
    v2 = deploy(rt, "v2", bundle("v2"))
    assert v2.outcome == "deployed"
    assert v2.url == v1.url and v2.previous_artifact == "v1"
    assert version(v2.url) == "v2"
    assert v2.pid != v1.pid and gone(v1.pid, within_s=0)
    assert len(ours(rt.root)) == 2  # the proxy and v2


def test_request_in_flight_on_the_old_version_completes(rt: LocalRuntime, bundle) -> None:
    v1 = deploy(rt, "v1", bundle("v1"))
    result: dict = {}

    def slow_request() -> None:
        result["response"] = httpx.get(f"{v1.url}/slow", params={"seconds": 2.5}, timeout=10)

    client = threading.Thread(target=slow_request)
    client.start()
    time.sleep(0.3)  # the request is now being served by v1
    v2 = deploy(rt, "v2", bundle("v2"))
    client.join(10)
    assert v2.outcome == "deployed" and version(v2.url) == "v2"
    assert result["response"].status_code == 200 and result["response"].json()["version"] == "v1"


def test_deploying_the_live_artifact_again_is_a_no_op(rt: LocalRuntime, bundle) -> None:
    first = deploy(rt, "v1", bundle("v1"))
    again = deploy(rt, "v1", bundle("v1-copy"))
    assert again.outcome == "unchanged"
    assert again.pid == first.pid and again.url == first.url
    assert again.duration_s < 3


def test_unhealthy_version_is_rolled_back_with_its_log(rt: LocalRuntime, bundle, tmp_path: Path) -> None:
    v2 = deploy(rt, "v2", bundle("v2"))
    # Long enough for the app to start and answer 500 even on a loaded machine.
    impatient = LocalRuntime(rt.root, health_timeout_s=6, stop_grace_s=3)
    out = deploy(impatient, "v3", bundle("v3", BROKEN))
    assert out.outcome == "rolled_back" and not out.ok
    assert out.pid == v2.pid and out.previous_artifact == "v2" and out.artifact == "v3"
    assert "HTTP 500" in out.reason
    assert "v3: health check is wired to fail" in out.reason  # the tail of its log
    assert version(out.url) == "v2"
    assert state(rt)["pending"] is None and state(rt)["live"]["artifact"] == "v2"
    assert len(ours(rt.root)) == 2


def test_crash_at_import_rolls_back_without_waiting_for_the_timeout(rt: LocalRuntime, bundle) -> None:
    v1 = deploy(rt, "v1", bundle("v1"))
    out = deploy(rt, "v4", bundle("v4", CRASHES))
    assert out.outcome == "rolled_back"
    assert out.duration_s < rt.health_timeout_s / 3
    assert "exited with code" in out.reason and "boom: v4 cannot start" in out.reason
    assert version(out.url) == "v1" and out.pid == v1.pid


def test_version_that_never_answers_is_rolled_back_after_the_timeout(rt: LocalRuntime, bundle) -> None:
    deploy(rt, "v1", bundle("v1"))
    impatient = LocalRuntime(rt.root, health_timeout_s=2, stop_grace_s=1)
    out = deploy(impatient, "v5", bundle("v5", HANGS))
    assert out.outcome == "rolled_back"
    assert 2 <= out.duration_s < 15
    assert "not healthy after 2s" in out.reason
    assert version(out.url) == "v1"
    assert len(ours(rt.root)) == 2


def test_failure_after_cutover_switches_back(rt: LocalRuntime, bundle, monkeypatch) -> None:
    v1 = deploy(rt, "v1", bundle("v1"))
    monkeypatch.setattr(LocalRuntime, "_public_probe", lambda self, state: (False, "simulated outage"))
    out = deploy(rt, "v2", bundle("v2"))
    monkeypatch.undo()
    assert out.outcome == "rolled_back" and "simulated outage" in out.reason
    assert version(out.url) == "v1" and out.pid == v1.pid
    assert rt.status("shop", "dev").healthy


def test_failed_first_deploy_leaves_nothing_running(rt: LocalRuntime, bundle) -> None:
    out = deploy(rt, "v1", bundle("v1", CRASHES))
    assert out.outcome == "failed" and out.pid is None
    assert "nothing is running" in out.reason and "boom: v1 cannot start" in out.reason
    assert ours(rt.root) == []
    assert rt.status("shop", "dev") is None and rt.list() == []
    retry = deploy(rt, "v2", bundle("v2"))
    assert retry.outcome == "deployed" and version(retry.url) == "v2"


def test_stop_all_leaves_no_process(rt: LocalRuntime, bundle) -> None:
    app = bundle("v1")
    outs = [deploy(rt, "v1", app, env) for env in ("dev", "staging")]
    pids = [o.pid for o in outs] + [rt.status("shop", env).proxy_pid for env in ("dev", "staging")]
    assert len(set(pids)) == 4 and len({o.url for o in outs}) == 2
    assert rt.stop_all() == 2
    assert all(gone(pid, within_s=0) for pid in pids)
    assert rt.status("shop", "dev") is None and rt.list() == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{outs[0].url}/healthz", timeout=2)
    assert rt.stop("shop", "dev") is False


def test_recycled_pid_in_state_is_not_killed(rt: LocalRuntime, bundle) -> None:
    out = deploy(rt, "v1", bundle("v1"))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Worst case: the pid is reused and even its start time matches what we recorded.
        doc = state(rt)
        doc["live"].update(pid=stranger.pid, create_time=psutil.Process(stranger.pid).create_time())
        (rt.root / "shop" / "dev" / "state.json").write_text(json.dumps(doc))
        assert rt.status("shop", "dev").pid is None
        assert rt.stop("shop", "dev") is True
        assert stranger.poll() is None, "a process that is not ours was killed"
        assert gone(out.pid, within_s=0), "ours, found by its tag, must still be stopped"
    finally:
        stranger.kill()
        stranger.wait()


def test_deployment_outlives_the_process_that_deployed_it(rt: LocalRuntime, bundle) -> None:
    done = run_script(DEPLOY_AND_EXIT, rt.root, "v1", bundle("v1"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["outcome"] == "deployed"
    st = rt.status("shop", "dev")
    assert st.healthy and st.pid == out["pid"]
    assert version(st.url) == "v1"
    # stop_all (in the fixture) must still reach processes whose parent has exited.
    pids = [st.pid, st.proxy_pid]
    assert rt.stop_all() == 1
    assert all(gone(pid, within_s=0) for pid in pids)


def test_interrupted_deploy_is_adopted_when_healthy(rt: LocalRuntime, bundle) -> None:
    v1 = deploy(rt, "v1", bundle("v1"))
    v2_dir = bundle("v2")
    crashed = run_script(DIE_BEFORE_CUTOVER, rt.root, "v2", v2_dir)
    assert crashed.returncode == 3, crashed.stderr
    pending = state(rt)["pending"]
    assert pending["artifact"] == "v2" and not gone(pending["pid"], within_s=0)
    assert version(v1.url) == "v1"  # the crash happened before cutover
    out = deploy(rt, "v2", v2_dir)
    assert out.outcome == "deployed" and "adopted" in out.reason
    assert out.pid == pending["pid"]
    assert version(out.url) == "v2" and gone(v1.pid, within_s=0)
    assert len(ours(rt.root)) == 2


def test_interrupted_deploy_is_cleaned_up_when_dead_or_superseded(rt: LocalRuntime, bundle) -> None:
    deploy(rt, "v1", bundle("v1"))
    v2_dir, v3_dir = bundle("v2"), bundle("v3")
    assert run_script(DIE_BEFORE_CUTOVER, rt.root, "v2", v2_dir).returncode == 3
    superseded = state(rt)["pending"]["pid"]
    out = deploy(rt, "v3", v3_dir)
    assert out.outcome == "deployed" and version(out.url) == "v3"
    assert gone(superseded, within_s=0)

    assert run_script(DIE_BEFORE_CUTOVER, rt.root, "v2", v2_dir).returncode == 3
    dead = state(rt)["pending"]["pid"]
    os.kill(dead, signal.SIGKILL)
    assert gone(dead)
    out = deploy(rt, "v2", v2_dir)
    assert out.outcome == "deployed" and out.pid != dead and version(out.url) == "v2"
    assert len(ours(rt.root)) == 2


def test_dead_proxy_is_restarted_on_the_same_port(rt: LocalRuntime, bundle) -> None:
    first = deploy(rt, "v1", bundle("v1"))
    proxy_pid = rt.status("shop", "dev").proxy_pid
    os.kill(proxy_pid, signal.SIGKILL)
    assert gone(proxy_pid)
    st = rt.status("shop", "dev")
    assert not st.healthy and st.proxy_pid is None and st.pid == first.pid
    again = deploy(rt, "v1", bundle("v1-again"))
    assert again.outcome == "unchanged" and again.url == first.url
    assert version(again.url) == "v1"


def test_a_published_port_taken_while_the_proxy_was_down_names_its_holder(tmp_path: Path, bundle) -> None:
    runtime = LocalRuntime(tmp_path / "runtime", health_timeout_s=30, stop_grace_s=3, rebind_grace_s=0.3)
    squatter = None
    try:
        first = runtime.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1"))
        os.kill(runtime.status("shop", "dev").proxy_pid, signal.SIGKILL)
        port = int(first.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while squatter is None:
            try:
                squatter = listener(port)
            except OSError:  # the killed proxy's listening socket is not closed yet
                assert time.monotonic() < deadline
                time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DeployError, match=rf"port {port} is taken by pid {os.getpid()} .*cannot be kept"):
            runtime.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1-again"))
        assert time.monotonic() - started >= 0.3  # it waited out the grace period first
        squatter.close()
        squatter = None
        again = runtime.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1-third"))
        assert again.url == first.url and version(again.url) == "v1"
    finally:
        if squatter is not None:
            squatter.close()
        runtime.stop_all()
        assert ours(runtime.root) == []


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # binds beside closing connections, as the runtime
    sock.bind(("127.0.0.1", port))
    sock.listen(1)
    return sock


def free_block(n: int) -> int:
    """The low end of `n` consecutive public ports that are free right now."""
    lo, hi = runtime_module.PUBLIC_PORTS
    for start in range(hi - n, lo, -n):
        try:
            for s in [listener(p) for p in range(start, start + n)]:
                s.close()
            return start
        except OSError:
            continue
    raise AssertionError("no free block of public ports")


def test_public_urls_come_from_the_public_range_and_skip_taken_ports(tmp_path: Path, bundle) -> None:
    """Stable URLs stay out of the kernel's ephemeral range, so no outgoing connection can take one."""
    low = free_block(3)
    taken = [listener(low), listener(low + 2)]
    runtime = LocalRuntime(tmp_path / "runtime", health_timeout_s=30, stop_grace_s=3, public_ports=(low, low + 2))
    try:
        out = runtime.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1"))
        assert out.url == f"http://127.0.0.1:{low + 1}" and version(out.url) == "v1"
        with pytest.raises(DeployError, match=f"every public port in {low}-{low + 2} is taken"):
            runtime.deploy(service="shop", environment="staging", artifact="v1", bundle_dir=bundle("v1-staging"))
        assert runtime.status("shop", "staging") is None
        assert [st.environment for st in runtime.list()] == ["dev"]
    finally:
        for sock in taken:
            sock.close()
        runtime.stop_all()
        assert ours(runtime.root) == []
    with pytest.raises(ValueError, match="public ports 30000-20000"):
        LocalRuntime(tmp_path / "other", public_ports=(30000, 20000))


def test_bad_names_and_bundles_are_refused(rt: LocalRuntime, bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service name"):
        rt.deploy(service="../etc", environment="dev", artifact="x", bundle_dir=bundle("v1"))
    with pytest.raises(ValueError, match="environment name"):
        rt.status("shop", "dev\n")
    with pytest.raises(DeployError, match="no service/app.py"):
        rt.deploy(service="shop", environment="dev", artifact="x", bundle_dir=tmp_path)


# ---- the proxy on its own ----------------------------------------------------------------------


def _backend(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_proxy_follows_its_target_file(tmp_path: Path) -> None:
    blue, green = _backend("blue"), _backend("green")
    target = tmp_path / "target"
    target.write_text(f"127.0.0.1:{blue.server_port}\n")
    port = _free_port()
    started = time.monotonic()
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "codemind_dagster.resources.proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--target-file",
            str(target),
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                assert httpx.get(url, timeout=2).text == "blue"
                break
            except httpx.ConnectError:
                assert time.monotonic() - started < 5, "proxy never listened"
                time.sleep(0.01)
        tmp = tmp_path / "target.tmp"
        tmp.write_text(f"127.0.0.1:{green.server_port}\n")
        os.replace(tmp, target)
        assert httpx.get(url, timeout=2).text == "green"
        target.write_text("")
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
    finally:
        proxy.terminate()
        try:
            proxy.wait(20)  # generous: a loaded 2-core CI box; a proxy that ignores SIGTERM still fails here
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
            raise
        finally:
            proxy.stderr.close()
        blue.shutdown()
        green.shutdown()


def test_proxy_imports_only_the_standard_library() -> None:
    argv = [sys.executable, "-X", "importtime", "-I", str(runtime_module.PROXY_SCRIPT), "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not {m.split(".")[0] for m in imported} & {
        "codemind_dagster",
        "psutil",
        "httpx",
        "dagster",
        "asyncio",
    }


def test_a_down_environment_keeps_its_port_and_other_listen_errors_are_not_a_full_range(
        tmp_path: Path, bundle) -> None:
    low = free_block(2)
    runtime = LocalRuntime(tmp_path / "runtime", health_timeout_s=30, stop_grace_s=3, public_ports=(low, low + 1))
    try:
        dev = runtime.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1"))
        os.kill(runtime.status("shop", "dev").proxy_pid, signal.SIGKILL)
        staging = runtime.deploy(service="shop", environment="staging", artifact="v1", bundle_dir=bundle("v1-s"))
        assert {dev.url, staging.url} == {f"http://127.0.0.1:{low}", f"http://127.0.0.1:{low + 1}"}
        with pytest.raises(DeployError, match="every public port"):
            runtime.deploy(service="shop", environment="production", artifact="v1", bundle_dir=bundle("v1-p"))
    finally:
        runtime.stop_all()
        assert ours(runtime.root) == []
    elsewhere = LocalRuntime(tmp_path / "elsewhere", host="10.255.255.1", public_ports=(low, low + 1))
    with pytest.raises(DeployError, match=r"cannot listen on 10\.255\.255\.1:\d+: .*(assign|Cannot)"):
        elsewhere.deploy(service="shop", environment="dev", artifact="v1", bundle_dir=bundle("v1-e"))
    assert ours(elsewhere.root) == []


@pytest.mark.parametrize("text", ["abc", "20000", "30000-20000", "80-90", "20000-70000"])
def test_a_bad_public_port_range_is_a_clear_settings_error(text: str) -> None:
    from pydantic import ValidationError

    from codemind_dagster.settings import Settings

    assert Settings.from_env({"CODEMIND_PUBLIC_PORTS": "21000-21010"}).public_ports == (21000, 21010)
    with pytest.raises(ValidationError, match="public_ports") as info:
        Settings.from_env({"CODEMIND_PUBLIC_PORTS": text})
    assert "LOW-HIGH" in str(info.value) or "within 1024-65535" in str(info.value)
