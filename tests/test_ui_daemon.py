"""With `codemind ui` running, an intent dropped into the inbox reaches production by itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(env) -> dict:
    out = subprocess.run([sys.executable, "-m", "codemind_dagster.cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def test_dropped_intent_reaches_production_through_the_daemon(settings, examples, runtime_cleanup, tmp_path):
    env = {**os.environ, "CODEMIND_HOME": str(settings.home)}
    env.pop("DAGSTER_HOME", None)  # `codemind ui` must find its instance under CODEMIND_HOME by itself
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "codemind_dagster.cli", "ui", "--port", str(port)], env=env,
                          cwd=tmp_path, stdout=open(tmp_path / "ui.log", "wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("the Dagster UI did not come up: " + (tmp_path / "ui.log").read_text()[-2000:])
        settings.intents_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(examples / "incident-tracker.yaml", settings.intents_dir)
        deadline, doc = time.monotonic() + 300, {}
        while time.monotonic() < deadline:
            doc = status(env)
            if doc["intents"] and doc["intents"][0]["state"] == "live":
                break
            time.sleep(3)
        else:
            pytest.fail(f"not live in time: {doc}\n" + (tmp_path / "ui.log").read_text()[-3000:])
        prod = doc["intents"][0]["environments"]["production"]
        r = httpx.post(f"{prod['url']}/services", json={"slug": "billing"}, timeout=5)
        assert r.status_code == 201 and r.json()["criticality"] == "medium", r.text
        assert httpx.get(f"{prod['url']}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(ui.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        ui.wait(timeout=10)
