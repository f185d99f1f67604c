"""Pipeline benchmark: first full run, unchanged re-run, and a plain-script baseline without Dagster.

Usage: .venv/bin/python benchmarks/pipeline.py [--intents N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ENTITY_SETS = [
    ("Customer", [("email", "string", "format: email, unique: true, required: true"), ("points", "integer",
                  "minimum: 0")]),
    ("Ticket", [("title", "string", "min_length: 3, max_length: 80, required: true"),
                ("priority", "string", "enum: [low, high], default: low")]),
    ("Reading", [("value", "number", "minimum: -50, maximum: 150"), ("taken_at", "datetime", "required: true"),
                 ("ok", "boolean", "default: true")]),
]


def make_intent(i: int) -> str:
    parent, pfields = ENTITY_SETS[i % len(ENTITY_SETS)]
    fields = "\n".join(f"        - {{name: {n}, type: {t}, {extra}}}" for n, t, extra in pfields)
    return f"""apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {{name: bench-{i:03d}}}
spec:
  summary: Benchmark intent {i}.
  entities:
    - name: {parent}
      fields:
{fields}
    - name: Note
      fields:
        - {{name: body, type: text, max_length: 500}}
        - {{name: subject, type: ref, to: {parent}, on_delete: {'cascade' if i % 2 else 'restrict'}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never became healthy")


def baseline(intent_files: list[Path], work: Path) -> tuple[float, list[subprocess.Popen]]:
    """The same work as a plain script: generate, test with coverage and a scan, start, health-check."""
    from codemind_dagster.agents.contract.suite import render_contract_suite
    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.domain.intent import read_intent_file

    procs = []
    started = time.perf_counter()
    for f in intent_files:
        intent = read_intent_file(f)
        d = work / intent.name
        for rel, text in {**render_service(intent), **render_contract_suite(intent)}.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        py = sys.executable
        subprocess.run([py, "-m", "coverage", "run", "--source=service", "-m", "pytest", "-q", "-p",
                        "no:cacheprovider", "--junitxml=junit.xml", "tests", "contract_tests"], cwd=d,
                       check=True, capture_output=True)
        subprocess.run([py, "-m", "coverage", "json", "-q", "-o", "coverage.json"], cwd=d, check=True,
                       capture_output=True)
        subprocess.run([py, "-m", "bandit", "-r", "service", "-f", "json", "-o", "bandit.json", "-q"], cwd=d,
                       capture_output=True)
        for env in intent.spec.promotion.environments:
            port = free_port()
            procs.append(subprocess.Popen(
                [py, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)], cwd=d,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CODEMIND_DATA_DIR": str(d / f"data-{env}")},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_healthy(f"http://127.0.0.1:{port}")
    return time.perf_counter() - started, procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=20, help="how many generated intents (default 20)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="codemind-bench-"))
    os.environ["CODEMIND_HOME"] = str(tmp / "home")
    os.environ["DAGSTER_HOME"] = str(tmp / "home" / "dagster")
    src = tmp / "intents"
    src.mkdir()
    files = []
    for i in range(args.intents):
        files.append(src / f"bench-{i:03d}.yaml")
        files[-1].write_text(make_intent(i))

    from codemind_dagster.driver import Driver
    from codemind_dagster.settings import Settings

    settings = Settings.from_env()
    driver = Driver(settings, progress=lambda m: None)
    store = driver.defs.resources["intent_store"].store()
    db = driver.defs.resources["database"].client()
    runtime = driver.defs.resources["runtime"].runtime()
    procs: list[subprocess.Popen] = []
    try:
        def run_all() -> float:
            t0 = time.perf_counter()
            for f in files:
                store.submit(f)
            outcomes = driver.run_until_idle()
            failed = [o for o in outcomes if not o.success]
            if failed:
                raise SystemExit(f"benchmark run failed: {failed[0].intent}: {failed[0].error}")
            return time.perf_counter() - t0

        def model_calls() -> int:
            return len([c for c in db.llm_calls() if not c.cache_hit])

        first = run_all()
        calls_first = model_calls()
        live = len(db.live_deployments())
        rerun = run_all()
        rerun_calls = model_calls() - calls_first
        runtime.stop_all()
        base, procs = baseline(files, tmp / "baseline")
    finally:
        runtime.stop_all()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        driver.instance.dispose()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [("first full run (Dagster, sensors, promotion)", first, first / base),
            ("unchanged re-run", rerun, rerun / base),
            ("plain-script baseline (no Dagster)", base, 1.0)]
    print(f"\n{args.intents} intents, {live} environments deployed, {calls_first} model calls on the first run\n")
    print(f"{'measurement':<46} {'seconds':>9} {'x baseline':>11}")
    for name, secs, ratio in rows:
        print(f"{name:<46} {secs:>9.2f} {ratio:>11.2f}")
    print(f"{'re-run / first run':<46} {'':>9} {rerun / first:>11.3f}")
    print(f"RESULT first_s={first:.2f} rerun_s={rerun:.2f} baseline_s={base:.2f} rerun_llm_calls={rerun_calls}")


if __name__ == "__main__":
    main()
