"""The `codemind` CLI end to end: submit (with the hostile corpus), demo, status, approve, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from click.testing import CliRunner

from codemind_dagster.cli import main

HOSTILE = Path(__file__).parent / "data" / "hostile"
EXPECTED = yaml.safe_load((HOSTILE / "expected.yaml").read_text())

UNSEEN_INTENT = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: plant-club}
spec:
  summary: Members swap plants.
  entities:
    - name: Member
      fields:
        - {name: handle, type: string, required: true, unique: true, min_length: 2, max_length: 20}
        - {name: joined_at, type: datetime}
    - name: Plant
      plural: greens
      fields:
        - {name: species, type: string, enum: [fern, cactus, ivy], default: fern}
        - {name: owner, type: ref, to: Member, on_delete: cascade, required: true}
        - {name: height_cm, type: number, minimum: 0, maximum: 500}
      operations: [create, read, list, delete]
  promotion: {environments: [dev, production]}
"""


def codemind(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codemind_dagster.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600, check=False)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("name", sorted(EXPECTED), ids=str)
def test_submit_refuses_every_hostile_file(name: str, codemind_home: Path, tmp_path: Path):
    runner = CliRunner()
    before = files_under(tmp_path)
    result = runner.invoke(main, ["intent", "submit", str(HOSTILE / name)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and EXPECTED[name] in result.stderr
    created = files_under(tmp_path) - before
    # Only the platform DB may appear, and only under CODEMIND_HOME; no intent, no inbox copy.
    assert all(p.is_relative_to(codemind_home) for p in created)
    assert not (codemind_home / "intents").exists() or not any((codemind_home / "intents").iterdir())
    from codemind_dagster.resources.database import PlatformDB
    from codemind_dagster.settings import Settings

    assert PlatformDB(Settings.from_env().db_url).intent_rows() == []
    assert not (codemind_home / "dagster").exists()  # no Dagster instance, hence no partition


def test_submit_refuses_generated_binary_and_oversized_files(tmp_path: Path):
    runner = CliRunner()
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert "binary content" in runner.invoke(main, ["intent", "submit", str(garbage)]).stderr
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (300 * 1024))
    r = runner.invoke(main, ["intent", "submit", str(big)])
    assert r.exit_code == 2 and "256 KiB" in r.stderr


def test_submit_prints_the_partition_key_and_is_idempotent(tmp_path: Path, codemind_home: Path, examples):
    r = codemind("intent", "submit", str(examples / "loyalty-points.yaml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loyalty-points" and "new" in r.stderr
    assert (codemind_home / "intents" / "loyalty-points.yaml").is_file()
    again = codemind("intent", "submit", str(examples / "loyalty-points.yaml"))
    assert again.returncode == 0 and "unchanged" in again.stderr


def test_every_command_has_help():
    runner = CliRunner()
    for args in ([], ["intent"], ["intent", "submit"], ["demo"], ["status"], ["approve"], ["down"], ["ui"], ["state"], ["backup"],
                 ["dr"], ["dr", "validate"], ["backfill"], ["backfill", "cost-report"],
                 ["llm"], ["llm", "check"]):
        r = runner.invoke(main, [*args, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, args


def test_approve_explains_what_is_wrong(tmp_path: Path, examples):
    runner = CliRunner()
    assert "no intent named 'nope'" in runner.invoke(main, ["approve", "nope", "production"]).stderr
    runner.invoke(main, ["intent", "submit", str(examples / "loyalty-points.yaml")])
    r = runner.invoke(main, ["approve", "loyalty-points", "staging"])
    assert r.exit_code == 2 and "does not require approval for staging" in r.stderr
    r = runner.invoke(main, ["approve", "loyalty-points", "production"])
    assert r.exit_code == 2 and "no release yet" in r.stderr


@pytest.mark.slow
def test_demo_takes_unseen_intents_to_production(tmp_path: Path, codemind_home: Path, runtime_cleanup):
    inbox = tmp_path / "mine"
    inbox.mkdir()
    (inbox / "plant-club.yaml").write_text(UNSEEN_INTENT)
    r = codemind("demo", "--intents", str(inbox))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "plant-club: pipeline" in r.stdout and "deploy to production ok" in r.stdout

    doc = json.loads(codemind("status", "--json").stdout)
    [s] = doc["intents"]
    assert s["name"] == "plant-club" and s["state"] == "live" and doc["rejected"] == []
    assert s["tests"]["failed"] == 0 and s["tests"]["passed"] > 0
    assert set(s["checks"].values()) == {True}
    assert set(s["environments"]) == {"dev", "production"} and s["llm_cost_usd"] == 0
    prod = s["environments"]["production"]
    assert prod["healthy"] and prod["pid"] and len(prod["artifact"]) == 64

    url = prod["url"]
    member = httpx.post(f"{url}/members", json={"handle": "ada"}, timeout=5)
    assert member.status_code == 201 and member.json()["joined_at"] is None
    plant = httpx.post(f"{url}/greens", json={"owner": member.json()["id"]}, timeout=5)
    assert plant.status_code == 201 and plant.json()["species"] == "fern"
    assert httpx.post(f"{url}/greens", json={"owner": 999}, timeout=5).status_code == 422
    assert httpx.patch(f"{url}/greens/{plant.json()['id']}", json={}, timeout=5).status_code in (404, 405)
    assert httpx.delete(f"{url}/members/{member.json()['id']}", timeout=5).status_code == 204
    assert httpx.get(f"{url}/greens/{plant.json()['id']}", timeout=5).status_code == 404  # cascade

    pids = [e["pid"] for e in s["environments"].values()]
    down = codemind("down")
    assert down.returncode == 0 and "stopped 2" in down.stdout
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    after = json.loads(codemind("status", "--json").stdout)["intents"][0]
    assert not after["environments"]["production"]["healthy"]


@pytest.mark.slow
def test_demo_retries_an_intent_whose_pipeline_failed(tmp_path: Path, codemind_home: Path, runtime_cleanup):
    """A pipeline that failed (here: a sandbox time limit too short for the tests) runs again on the next demo."""
    inbox = tmp_path / "mine"
    inbox.mkdir()
    (inbox / "plant-club.yaml").write_text(UNSEEN_INTENT)
    first = codemind("demo", "--intents", str(inbox), env={"CODEMIND_SANDBOX_TIMEOUT_S": "0.05"})
    assert first.returncode == 1 and "plant-club did not reach production" in first.stdout
    [failed] = json.loads(codemind("status", "--json").stdout)["intents"]
    assert failed["state"] == "failed" and failed["error"].startswith("test_results:")

    again = codemind("demo", "--intents", str(inbox))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "retrying plant-club: its last pipeline failed (test_results:" in again.stdout
    [live] = json.loads(codemind("status", "--json").stdout)["intents"]
    assert live["state"] == "live" and live["error"] is None
    assert "retrying" not in codemind("demo", "--intents", str(inbox)).stdout  # a live intent is left alone
    codemind("down")


@pytest.mark.slow
def test_demo_fails_when_an_intent_is_refused(tmp_path: Path, runtime_cleanup):
    inbox = tmp_path / "mixed"
    inbox.mkdir()
    (inbox / "bad.yaml").write_text("apiVersion: codemind.dev/v1\nkind: BusinessIntent\n")
    r = codemind("demo", "--intents", str(inbox))
    assert r.returncode == 1
    assert "refused" in r.stdout and "bad.yaml: metadata: required key is missing" in r.stdout
