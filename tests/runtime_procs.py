"""The processes a LocalRuntime started, found by the root it put in their environment."""

from __future__ import annotations

from pathlib import Path

import psutil

from codemind_dagster.resources.runtime import ROOT_VAR


def ours(root: Path) -> list[psutil.Process]:
    """Running processes started by the runtime rooted at `root`, found by their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(ROOT_VAR) == str(root.resolve()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
