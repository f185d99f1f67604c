"""Prometheus file_sd targets from the local runtime's state: each environment's proxy and service processes."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

PROXY_JOB = "codemind-proxy"
SERVICE_JOB = "codemind-service"
# Where `make monitoring-up` keeps its config, data and the targets file, under CODEMIND_HOME.
MONITORING_DIR = "monitoring"
TARGETS_FILE = "targets.json"


def targets_path(home: Path) -> Path:
    """The targets file Prometheus of `make monitoring-up` reads: $CODEMIND_HOME/monitoring/targets.json."""
    return Path(home) / MONITORING_DIR / TARGETS_FILE


def scrape_targets(runtime_root: Path, host: str = "127.0.0.1") -> list[dict]:
    """file_sd entries: each environment's proxy metrics port and the /metrics of its live and pending versions."""
    root = Path(runtime_root)
    out: list[dict] = []
    for state_file in sorted(root.glob("*/*/state.json")) if root.is_dir() else ():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or broken: the runtime reports that; the next write picks it up
        service, environment = state.get("service"), state.get("environment")
        if not service or not environment:
            continue
        base = {"service": service, "environment": environment}
        proxy = state.get("proxy") or {}
        if proxy.get("metrics_port"):
            out.append({"targets": [f"{host}:{proxy['metrics_port']}"], "labels": {"job": PROXY_JOB, **base}})
        for record in (state.get("live"), state.get("pending")):
            if record and record.get("port"):
                labels = {"job": SERVICE_JOB, **base, "color": str(record.get("color") or ""),
                          "version": str(record.get("artifact") or "")}
                out.append({"targets": [f"{host}:{record['port']}"], "labels": labels})
    return out


def write_targets(runtime_root: Path, path: Path, host: str = "127.0.0.1") -> bool:
    """Write scrape_targets() to `path` atomically, only when it changed; True when it was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Environments deploy in parallel: each writer reads every state under the lock, so the last one is current.
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = json.dumps(scrape_targets(runtime_root, host), indent=2, sort_keys=True) + "\n"
        try:
            if path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        # Prometheus re-reads the file on change: it must never see half of it.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return True


def sync_targets(runtime_root: Path, home: Path | None = None, host: str = "127.0.0.1") -> bool:
    """write_targets() into <home>/monitoring/targets.json when `make monitoring-up` made that dir; else nothing.

    `home` defaults to the runtime root's parent ($CODEMIND_HOME for $CODEMIND_HOME/runtime). A write that fails
    returns False and leaves the previous file: monitoring must never fail a deploy.
    """
    root = Path(runtime_root).resolve()
    path = targets_path(root.parent if home is None else Path(home))
    if not path.parent.is_dir():
        return False
    try:
        return write_targets(root, path, host)
    except OSError:
        return False
