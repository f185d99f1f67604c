"""devservices.neo4j: the cached harness build, a server that starts, answers and leaves no process behind."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devservices import neo4j, servers

pytestmark = pytest.mark.neo4j
REPO = Path(__file__).resolve().parent.parent


def launchers(marker: Path) -> list[int]:
    """Pids of launcher JVMs whose command line names the given directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if neo4j.MAIN_CLASS.encode() in cmd and any(str(marker).encode() in c for c in cmd) \
                and servers.alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def answers(url: str, auth: tuple[str, str]) -> int:
    import neo4j as driver

    with driver.GraphDatabase.driver(url, auth=auth, connection_timeout=5) as d:
        records, _, _ = d.execute_query("RETURN 41 + 1 AS n")
    return records[0]["n"]


def test_a_built_harness_is_cached(neo4j_server):
    t0 = time.monotonic()
    assert neo4j.build() == neo4j.home()
    assert time.monotonic() - t0 < 1.0
    assert neo4j.home().name == neo4j.HARNESS_VERSION
    assert (neo4j.home() / "lib" / f"neo4j-harness-{neo4j.HARNESS_VERSION}.jar").is_file()
    assert (neo4j.home() / ".built").read_text().startswith(neo4j.HARNESS_VERSION)


def test_a_half_done_build_is_redone(neo4j_server, tmp_path, monkeypatch):
    # Jars resolved, launcher never compiled (the marker is missing): build() must finish, not trust it.
    cache = tmp_path / "cache"
    (cache / neo4j.HARNESS_VERSION).mkdir(parents=True)
    (cache / neo4j.HARNESS_VERSION / "lib").symlink_to(neo4j.home() / "lib")
    monkeypatch.setenv("CODEMIND_NEO4J_CACHE", str(cache))
    assert not neo4j.built()
    with pytest.raises(neo4j.Neo4jSetupError, match="is not built"):
        neo4j.start(tmp_path / "never")
    neo4j.build()
    assert neo4j.built()
    assert (cache / neo4j.HARNESS_VERSION / "classes" / f"{neo4j.MAIN_CLASS}.class").is_file()
    # A launcher that changed since is rebuilt too.
    (cache / neo4j.HARNESS_VERSION / ".built").write_text(f"{neo4j.HARNESS_VERSION} stale\n")
    assert not neo4j.built()


def test_missing_java_and_maven_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODEMIND_NEO4J_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert neo4j.missing_tools() == ["java", "javac", "mvn"]
    assert neo4j.main(["build"]) == 1
    err = capsys.readouterr().err
    assert "java, javac, mvn not found on PATH" in err and "apt-get install" in err
    assert not (tmp_path / "cache" / neo4j.HARNESS_VERSION / "lib").exists()


def test_start_answers_with_auth_and_stop_leaves_no_process(neo4j_server, tmp_path):
    work = tmp_path / "one"
    server = neo4j.start(work, password="a-test-password")
    try:
        assert server.url.startswith("bolt://127.0.0.1:") and servers.alive(server.pid)
        assert answers(server.url, ("neo4j", "a-test-password")) == 42
        import neo4j as driver

        with pytest.raises(driver.exceptions.AuthError):
            answers(server.url, ("neo4j", "not-the-password"))
        print(f"server start took {server.started_s:.1f}s")
    finally:
        t0 = time.monotonic()
        server.stop()
    assert time.monotonic() - t0 < 5, "a clean shutdown should not wait out Netty's quiet period"
    assert server.proc.returncode == 0 and not launchers(work)
    assert "STOPPED" in server.log.read_text()


def test_a_port_in_use_is_refused_clearly(neo4j_server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(neo4j.Neo4jSetupError, match=f"port {port} on 127.0.0.1 is in use"):
            neo4j.start(tmp_path / "busy", port=port)
    session_port = int(neo4j_server.url.rsplit(":", 1)[1])
    with pytest.raises(neo4j.Neo4jSetupError, match=f"port {session_port} .* is in use"):
        neo4j.start(tmp_path / "busy", port=session_port)
    assert not launchers(tmp_path / "busy")


def test_a_server_that_cannot_start_reports_its_log(neo4j_server, tmp_path):
    work = tmp_path / "broken"
    work.mkdir()
    (work / "data").write_text("a file where the data directory should be")
    with pytest.raises(neo4j.Neo4jSetupError, match=r"exited with \d+ before it was ready") as ei:
        neo4j.start(work)
    assert "FAILED" in str(ei.value) and str(work / "server.log") in str(ei.value)
    assert not launchers(work)


def test_a_start_that_times_out_leaves_no_process(neo4j_server, tmp_path):
    work = tmp_path / "slow"
    with pytest.raises(neo4j.Neo4jSetupError, match="did not report READY on port .* within 0.5s"):
        neo4j.start(work, timeout_s=0.5)
    assert not launchers(work)


def test_cli_up_status_down(neo4j_server, codemind_home):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "devservices.neo4j", *args], cwd=REPO, text=True,
                              capture_output=True, timeout=180, check=False,
                              env={**os.environ, "CODEMIND_HOME": str(codemind_home)})

    state = codemind_home / "neo4j"
    try:
        up = cli("up")
        assert up.returncode == 0, up.stderr
        url = (state / "url").read_text()
        assert f"export CODEMIND_NEO4J_URL={url} " in up.stdout
        assert "CODEMIND_NEO4J_PASSWORD=\"$(cat " in up.stdout
        password = (state / "password").read_text()
        assert password not in up.stdout and stat.S_IMODE((state / "password").stat().st_mode) == 0o600
        assert answers(url, ("neo4j", password)) == 42
        assert cli("up").stdout.splitlines()[0] == up.stdout.splitlines()[0], "a second up reuses the server"
        status = cli("status")
        assert status.returncode == 0 and url in status.stdout
    finally:
        down = cli("down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not launchers(state) and not (state / "pid").exists()
    assert cli("status").returncode == 3
    assert "was not running" in cli("down").stdout
