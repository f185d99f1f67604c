"""Neo4j from Maven Central's test harness, run in-process by a tiny Java launcher: build|up|down|status."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from devservices import servers

HARNESS_VERSION = "5.26.0"
USER = "neo4j"
MAIN_CLASS = "CodemindNeo4j"
# Fast start over peak throughput: a dev/test database is small and short-lived.
JVM_FLAGS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss1m",
             "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true", "-Dfile.encoding=UTF-8",
             "--add-opens=java.base/java.nio=ALL-UNNAMED", "--add-opens=java.base/java.io=ALL-UNNAMED",
             "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED", "--add-opens=java.base/java.lang=ALL-UNNAMED",
             "-Dio.netty.tryReflectionSetAccessible=true")
HEARTBEAT_S = 15.0
POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>codemind.local</groupId>
  <artifactId>neo4j-launcher</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.neo4j.test</groupId>
      <artifactId>neo4j-harness</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>3.8.1</version>
        <configuration>
          <outputDirectory>${{project.basedir}}/lib</outputDirectory>
          <includeScope>runtime</includeScope>
        </configuration>
      </plugin>
    </plugins>
  </build>
</project>
"""
LAUNCHER_SOURCE = """\
import java.nio.file.Path;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import java.time.Duration;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.harness.Neo4j;
import org.neo4j.harness.Neo4jBuilders;

/** Neo4j in-process on 127.0.0.1:PORT, data under DIR; runs until stdin closes ("stdin") or SIGTERM. */
public final class CodemindNeo4j {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        Path dir = Path.of(args[1]);
        boolean watchStdin = args.length > 2 && args[2].equals("stdin");
        String password = System.getenv("CODEMIND_NEO4J_PASSWORD");
        Neo4j neo4j;
        try {
            SocketAddress bolt = new SocketAddress("127.0.0.1", port);
            neo4j = Neo4jBuilders.newInProcessBuilder(dir)
                .withDisabledServer()
                .withConfig(BoltConnector.enabled, true)
                .withConfig(BoltConnector.listen_address, bolt)
                .withConfig(BoltConnector.advertised_address, bolt)
                .withConfig(GraphDatabaseSettings.auth_enabled, password != null)
                .withConfig(GraphDatabaseSettings.pagecache_memory, 64L * 1024 * 1024)
                // Netty's quiet period (5 s, twice) would make every clean shutdown take 10 s.
                .withConfig(GraphDatabaseInternalSettings.netty_server_shutdown_quiet_period, 0)
                .withConfig(GraphDatabaseInternalSettings.netty_server_shutdown_timeout, Duration.ofSeconds(5))
                .build();
        } catch (Throwable e) {
            System.out.println("FAILED " + e);
            e.printStackTrace(System.out);
            System.out.flush();
            Runtime.getRuntime().halt(2);
            return;
        }
        AtomicBoolean closed = new AtomicBoolean();
        Runnable shutdown = () -> {
            if (closed.compareAndSet(false, true)) {
                long t0 = System.nanoTime();
                neo4j.close();
                System.out.println("STOPPED in " + (System.nanoTime() - t0) / 1000000 + " ms");
                System.out.flush();
            }
        };
        Runtime.getRuntime().addShutdownHook(new Thread(shutdown, "codemind-neo4j-shutdown"));
        if (password != null) {
            neo4j.databaseManagementService().database("system").executeTransactionally(
                "ALTER USER neo4j SET PASSWORD $p CHANGE NOT REQUIRED", Map.of("p", password));
        }
        System.out.println("READY bolt://127.0.0.1:" + port);
        System.out.flush();
        if (watchStdin) {
            while (System.in.read() != -1) {
                // the parent holds the pipe open while it wants the server
            }
            System.exit(0);
        }
        new CountDownLatch(1).await();
    }
}
"""


class Neo4jSetupError(RuntimeError):
    """A tool the build or the server needs is missing, or the build failed."""


def cache_root() -> Path:
    """Where builds live; CODEMIND_NEO4J_CACHE overrides ~/.cache/codemind/neo4j."""
    return Path(os.environ.get("CODEMIND_NEO4J_CACHE") or Path.home() / ".cache" / "codemind" / "neo4j")


def home() -> Path:
    return cache_root() / HARNESS_VERSION


def _stamp() -> str:
    """What the marker records: a changed launcher is recompiled, the jars are kept."""
    return f"{HARNESS_VERSION} {hashlib.sha256(LAUNCHER_SOURCE.encode()).hexdigest()[:16]}\n"


def built() -> bool:
    try:
        return (home() / ".built").read_text() == _stamp()
    except FileNotFoundError:
        return False


def _say(msg: str) -> None:
    print(f"[neo4j-build] {msg}", file=sys.stderr, flush=True)


def _java_home_tool(name: str) -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / name).is_file():
        return str(Path(java_home) / "bin" / name)
    return shutil.which(name)


def missing_tools(for_build: bool = True) -> list[str]:
    """Tools not found on PATH (or in JAVA_HOME): java always, javac and mvn only to build."""
    names = ("java", "javac", "mvn") if for_build else ("java",)
    return [n for n in names if (shutil.which(n) if n == "mvn" else _java_home_tool(n)) is None]


def _require(names: list[str]) -> None:
    if names:
        raise Neo4jSetupError(f"{', '.join(names)} not found on PATH: Neo4j {HARNESS_VERSION} runs on Java 17+ "
                              "and is resolved from Maven Central by mvn (Debian: apt-get install "
                              "openjdk-17-jdk-headless maven)")


def _dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total / 1e6


def _run(cmd: list[str], cwd: Path, what: str, watch: Path | None = None) -> None:
    """Run a build step, printing a heartbeat while it is silent (a cold Maven resolution takes minutes)."""
    t0, done = time.monotonic(), threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            size = f", {_dir_mb(watch):.0f} MB in {watch}" if watch is not None and watch.is_dir() else ""
            _say(f"  still {what} ({time.monotonic() - t0:.0f}s{size})")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    finally:
        done.set()
    if p.returncode != 0:
        raise Neo4jSetupError(f"{what} failed ({' '.join(cmd[:3])} ...) in {cwd}:\n{(p.stdout + p.stderr)[-4000:]}")


def build() -> Path:
    """Resolve the harness and compile the launcher into home(); a warm cache returns at once."""
    out = home()
    if built():
        return out
    _require(missing_tools())
    out.mkdir(parents=True, exist_ok=True)
    # Test sessions and `up` may start at once: one builds, the others wait for it.
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            _build(out)
    return out


def _build(out: Path) -> None:
    t0 = time.monotonic()
    lib = out / "lib"
    if not (lib / ".complete").is_file():
        shutil.rmtree(lib, ignore_errors=True)
        (out / "pom.xml").write_text(POM.format(version=HARNESS_VERSION))
        m2 = Path.home() / ".m2" / "repository"
        _say(f"resolving org.neo4j.test:neo4j-harness:{HARNESS_VERSION} from Maven Central into {lib} "
             "(first time: about 180 MB)")
        _run([shutil.which("mvn"), "-q", "-B", "dependency:copy-dependencies"], out, "resolving with Maven", m2)
        (lib / ".complete").write_text(HARNESS_VERSION)
        _say(f"{len(list(lib.glob('*.jar')))} jars resolved ({time.monotonic() - t0:.0f}s)")
    _say("compiling the launcher")
    shutil.rmtree(out / "classes", ignore_errors=True)
    (out / "src").mkdir(exist_ok=True)
    (out / "classes").mkdir()
    source = out / "src" / f"{MAIN_CLASS}.java"
    source.write_text(LAUNCHER_SOURCE)
    _run([_java_home_tool("javac"), "--release", "17", "-nowarn", "-cp", str(lib / "*"),
          "-d", str(out / "classes"), str(source)], out, "compiling the launcher")
    # Last, so an interrupted build is redone rather than trusted.
    (out / ".built").write_text(_stamp())
    _say(f"Neo4j {HARNESS_VERSION} ready in {out} ({time.monotonic() - t0:.0f}s)")


class Neo4jServer:
    """A running launcher process: Bolt at `url`, user `user`, password `password`."""

    def __init__(self, proc: subprocess.Popen, url: str, password: str, workdir: Path):
        self.proc, self.url, self.password, self.workdir = proc, url, password, workdir
        self.user = USER
        self.log = workdir / "server.log"
        self.started_s: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut down cleanly (stdin closed, then SIGTERM) and wait; kill only if it hangs."""
        proc = self.proc
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=min(5.0, timeout_s))
                return
            except subprocess.TimeoutExpired:
                pass  # still starting (it reads stdin only once ready): SIGTERM ends it either way
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


def _command(port: int, data: Path, watch_stdin: bool) -> list[str]:
    cp = f"{home() / 'classes'}{os.pathsep}{home() / 'lib' / '*'}"
    return [_java_home_tool("java"), *JVM_FLAGS, "-cp", cp, MAIN_CLASS, str(port), str(data),
            "stdin" if watch_stdin else "signal"]


def start(workdir: Path, port: int | None = None, password: str | None = None, timeout_s: float = 120.0,
          detached: bool = False) -> Neo4jServer:
    """Start Neo4j with Bolt on 127.0.0.1 (a free port unless given), data and log under workdir."""
    if not built():
        raise Neo4jSetupError(f"Neo4j {HARNESS_VERSION} is not built: run `python -m devservices.neo4j build`")
    _require(missing_tools(for_build=False))
    if port is not None and servers.port_in_use(port):
        raise Neo4jSetupError(f"port {port} on 127.0.0.1 is in use: stop what listens there or omit the port")
    port = port or servers.free_port()
    password = password or secrets.token_urlsafe(16)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    env = {**os.environ, "CODEMIND_NEO4J_PASSWORD": password}
    with log_path.open("wb") as log:
        # Attached, the server ends when its stdin closes, so it dies with this process; detached (`up`),
        # only by SIGTERM.
        proc = subprocess.Popen(_command(port, workdir / "data", not detached), cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL if detached else subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=detached)
    server = Neo4jServer(proc, f"bolt://127.0.0.1:{port}", password, workdir)
    try:
        server.started_s = _wait_ready(server, port, timeout_s)
    except BaseException:
        # Not ready means not reading stdin yet: SIGTERM at once (the JVM's default, or the clean hook).
        if proc.poll() is None:
            proc.terminate()
        server.stop(timeout_s=10)
        raise
    return server


def _wait_ready(server: Neo4jServer, port: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while True:
        lines = _tail(server.log, 1_000_000).splitlines()
        if any(ln.startswith("READY ") for ln in lines):
            return time.monotonic() - t0
        if server.proc.poll() is not None:
            failed = [ln for ln in lines if ln.startswith("FAILED ")]
            raise Neo4jSetupError(f"Neo4j exited with {server.proc.returncode} before it was ready on port {port}"
                                  + (f": {failed[0][7:]}" if failed else "")
                                  + f" (log {server.log}):\n{_tail(server.log)}")
        if time.monotonic() - t0 > timeout_s:
            raise Neo4jSetupError(f"Neo4j did not report READY on port {port} within {timeout_s:g}s "
                                  f"(log {server.log}):\n{_tail(server.log)}")
        time.sleep(0.1)


# -- CLI: one detached server per CODEMIND_HOME --------------------------------------------------
SERVICE = "neo4j"


def state_dir() -> Path:
    return servers.state_dir(SERVICE)


def running() -> tuple[int, str] | None:
    """(pid, url) of the server `up` started, when it still runs."""
    return servers.running(SERVICE)


def up(port: int | None = None) -> str:
    """Start a detached server under state_dir() (once); returns its Bolt URL."""
    if (found := running()) is not None:
        return found[1]
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    build()
    password = secrets.token_urlsafe(16)
    server = start(d, port, password, detached=True)
    # Owner-only: the hint `up` prints reads it rather than showing the secret.
    fd = os.open(d / "password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    servers.record(SERVICE, server.pid, server.url)
    return server.url


def down(timeout_s: float = 30.0) -> bool:
    """Stop the server `up` started (SIGTERM: a clean shutdown); False when none ran."""
    return servers.stop(SERVICE, ("password",), timeout_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devservices.neo4j", description=__doc__)
    p.add_argument("command", choices=["build", "up", "down", "status"])
    p.add_argument("--port", type=int, default=None)
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            print(build())
            return 0
        if a.command == "up":
            url = up(a.port)
            print(f"Neo4j {HARNESS_VERSION} answers at {url} (user {USER})\n"
                  f"export CODEMIND_NEO4J_URL={url} CODEMIND_NEO4J_USER={USER} "
                  f"CODEMIND_NEO4J_PASSWORD=\"$(cat {state_dir() / 'password'})\"")
            return 0
    except Neo4jSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return servers.down_or_status(a.command, "Neo4j", SERVICE, down)


if __name__ == "__main__":
    sys.exit(main())
