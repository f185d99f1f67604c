"""What the detached dev services share: a state dir per service under CODEMIND_HOME, pidfiles, free ports."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path


def state_dir(service: str) -> Path:
    return Path(os.environ.get("CODEMIND_HOME", ".codemind")).expanduser().resolve() / service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something already listens on the loopback port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def running(service: str) -> tuple[int, str] | None:
    """(pid, url) of the server `up` started, when it still runs."""
    d = state_dir(service)
    try:
        pid, url = int((d / "pid").read_text()), (d / "url").read_text().strip()
    except (FileNotFoundError, ValueError):
        return None
    return (pid, url) if alive(pid) else None


def record(service: str, pid: int, url: str) -> None:
    d = state_dir(service)
    (d / "pid").write_text(str(pid))
    (d / "url").write_text(url)


def stop(service: str, extra_files: tuple[str, ...] = (), timeout_s: float = 5.0) -> bool:
    """SIGTERM the process group `up` started, SIGKILL after timeout_s; False when none ran."""
    found = running(service)
    for name in ("pid", "url", *extra_files):
        (state_dir(service) / name).unlink(missing_ok=True)
    if found is None:
        return False
    os.killpg(found[0], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(found[0]):
            return True
        time.sleep(0.1)
    os.killpg(found[0], signal.SIGKILL)
    return True


def down_or_status(command: str, label: str, service: str, down: Callable[[], bool]) -> int:
    """The `down` and `status` commands every dev service has; status exits 3 when nothing runs."""
    if command == "down":
        print(f"{label} stopped" if down() else f"{label} was not running")
        return 0
    found = running(service)
    print(f"{label}: {found[1]} (pid {found[0]})" if found else f"{label}: not running")
    return 0 if found else 3
