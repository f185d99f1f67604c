"""moto's server as a local AWS stand-in (S3, Secrets Manager, Cost Explorer): `python -m devservices.moto up|down|status`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx

from devservices import servers

SERVICE = "moto"


def state_dir() -> Path:
    return servers.state_dir(SERVICE)


def running() -> tuple[int, str] | None:
    """(pid, endpoint) of the server `up` started, when it still runs."""
    return servers.running(SERVICE)


def up(port: int | None = None, timeout_s: float = 30.0) -> str:
    """Start moto's server detached on 127.0.0.1 (a free port unless given); returns its endpoint."""
    if (found := running()) is not None:
        return found[1]
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    port = port or servers.free_port()
    url = f"http://127.0.0.1:{port}"
    log = (d / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (d / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto's server exited with {proc.returncode} on port {port}:\n{tail}")
        try:
            httpx.get(f"{url}/moto-api/", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"moto's server did not answer on {url} within {timeout_s:.0f}s (log: {d / 'server.log'})")
    servers.record(SERVICE, proc.pid, url)
    return url


def down() -> bool:
    """Stop the server `up` started; False when none ran."""
    return servers.stop(SERVICE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devservices.moto", description=__doc__)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, default=None)
    a = p.parse_args(argv)
    if a.command == "up":
        try:
            url = up(a.port)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"moto's server answers at {url}\n"
              f"export AWS_ENDPOINT_URL={url} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "
              f"AWS_DEFAULT_REGION=us-east-1 CODEMIND_S3_ENDPOINT_URL={url}")
        return 0
    return servers.down_or_status(a.command, "moto's server", SERVICE, down)


if __name__ == "__main__":
    sys.exit(main())
