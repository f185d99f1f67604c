"""moto's server as a local AWS stand-in (S3, Secrets Manager, Cost Explorer): `python -m devservices.moto up|down|status`."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def state_dir() -> Path:
    return Path(os.environ.get("CODEMIND_HOME", ".codemind")).expanduser().resolve() / "moto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def running() -> tuple[int, str] | None:
    """(pid, endpoint) of the server `up` started, when it still runs."""
    d = state_dir()
    try:
        pid, url = int((d / "pid").read_text()), (d / "url").read_text().strip()
    except (FileNotFoundError, ValueError):
        return None
    return (pid, url) if alive(pid) else None


def up(port: int | None = None, timeout_s: float = 30.0) -> str:
    """Start moto's server detached on 127.0.0.1 (a free port unless given); returns its endpoint."""
    if (found := running()) is not None:
        return found[1]
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
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
    (d / "pid").write_text(str(proc.pid))
    (d / "url").write_text(url)
    return url


def down() -> bool:
    """Stop the server `up` started; False when none ran."""
    found = running()
    for name in ("pid", "url"):
        (state_dir() / name).unlink(missing_ok=True)
    if found is None:
        return False
    os.killpg(found[0], signal.SIGTERM)
    for _ in range(50):
        if not alive(found[0]):
            return True
        time.sleep(0.1)
    os.killpg(found[0], signal.SIGKILL)
    return True


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
    if a.command == "down":
        print("moto's server stopped" if down() else "moto's server was not running")
        return 0
    found = running()
    print(f"moto's server: {found[1]} (pid {found[0]})" if found else "moto's server: not running")
    return 0 if found else 3


if __name__ == "__main__":
    sys.exit(main())
