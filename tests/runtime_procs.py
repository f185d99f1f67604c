"""What the runtime tests share: a small service to deploy, and the processes a LocalRuntime started."""

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


# A bundle's service/app.py answering /healthz, /version (its name) and /slow; `%(version)s` is the name.
HEALTHY = """
import os
import time
from fastapi import FastAPI

app = FastAPI()

@app.get("/healthz")
def healthz():
    return {"status": "ok"}

@app.get("/version")
def version():
    return {"version": "%(version)s", "data_dir": os.environ.get("CODEMIND_DATA_DIR")}

@app.get("/slow")
def slow(seconds: float):
    time.sleep(seconds)
    return {"version": "%(version)s"}
"""
