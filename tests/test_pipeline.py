"""The delivery loop end to end on the local profile: sensors, jobs, promotion, rollback, crash-resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import psutil
import pytest

from codemind_dagster.driver import Driver
from codemind_dagster.resources.approvals import approve_release
from codemind_dagster.status import platform_status

pytestmark = pytest.mark.slow


@pytest.fixture
def driver(settings, runtime_cleanup):
    d = Driver(settings, progress=lambda m: None)
    yield d
    d.instance.dispose()


def submit(driver, path):
    return driver.defs.resources["intent_store"].store().submit(path)


def status(driver):
    db = driver.defs.resources["database"].client()
    return {i["name"]: i for i in platform_status(driver.settings, db,
                                                  driver.defs.resources["runtime"].runtime())["intents"]}


def test_intent_reaches_production_through_the_approval_gate(driver, examples):
    submit(driver, examples / "loyalty-points.yaml")
    outcomes = driver.run_until_idle()
    assert all(o.success for o in outcomes), [o.error for o in outcomes if not o.success]
    s = status(driver)["loyalty-points"]
    assert s["state"] == "awaiting approval for production"
    assert s["checks"] == {"contract_tests_pass": True, "coverage_threshold": True,
                           "no_high_severity_findings": True}
    assert s["environments"]["staging"]["healthy"] and not s["environments"]["production"]["healthy"]

    db = driver.defs.resources["database"].client()
    assert "approved" in approve_release(db, "loyalty-points", "production", "test")
    driver.run_until_idle()
    s = status(driver)["loyalty-points"]
    assert s["state"] == "live"
    prod = s["environments"]["production"]
    assert prod["artifact"] == s["environments"]["dev"]["artifact"]
    # The production URL honours the contract: create, read back, list.
    r = httpx.post(f"{prod['url']}/customers", json={"email": "ada@example.com"}, timeout=5)
    assert r.status_code == 201, r.text
    assert httpx.get(f"{prod['url']}/customers/{r.json()['id']}", timeout=5).json()["email"] == "ada@example.com"
    assert httpx.get(f"{prod['url']}/customers", timeout=5).json()["total"] == 1

    # Re-running the unchanged intent: no run, and a forced re-materialization calls no model.
    assert driver.tick() == []
    calls_before = len([c for c in db.llm_calls(intent="loyalty-points") if not c.cache_hit])
    result = driver.defs.resolve_job_def("deliver_intent").execute_in_process(
        instance=driver.instance, partition_key="loyalty-points")
    assert result.success
    assert len([c for c in db.llm_calls(intent="loyalty-points") if not c.cache_hit]) == calls_before
    mat = result.asset_materializations_for_node("test_results")[0]
    assert mat.metadata["reused_from_earlier_run"].value is True
    evidence = Path(mat.metadata["evidence"].value)
    assert {"junit.xml", "coverage.json", "bandit.json"} <= {p.name for p in evidence.iterdir()}
    assert driver.tick() == []  # same artifact: nothing to promote
    assert [d.status for d in db.deployment_history("loyalty-points")].count("live") == 3


def test_changed_intent_is_rebuilt_and_promoted(driver, examples, settings):
    src = examples / "inventory-catalog.yaml"
    submit(driver, src)
    driver.run_until_idle()
    first = status(driver)["inventory-catalog"]
    assert first["state"] == "live"
    changed = settings.home / "changed.yaml"
    changed.write_text(src.read_text().replace("summary:", "summary: (v2)", 1))
    assert changed.read_text() != src.read_text()
    submit(driver, changed)
    outcomes = driver.run_until_idle()
    assert [o.job for o in outcomes] == ["deliver_intent", "deploy_dev", "deploy_staging", "deploy_production"]
    assert all(o.success for o in outcomes)
    second = status(driver)["inventory-catalog"]
    assert second["state"] == "live"
    new, old = second["environments"]["dev"]["artifact"], first["environments"]["dev"]["artifact"]
    assert new != old and {e["artifact"] for e in second["environments"].values()} == {new}
    db = driver.defs.resources["database"].client()
    statuses = [(d.artifact, d.status) for d in db.deployment_history("inventory-catalog")]
    assert statuses.count((old, "superseded")) == 3 and statuses.count((new, "live")) == 3


def test_unhealthy_release_rolls_back_and_the_old_one_keeps_serving(driver, examples):
    submit(driver, examples / "inventory-catalog.yaml")
    driver.run_until_idle()
    name = next(iter(status(driver)))
    db = driver.defs.resources["database"].client()
    good = status(driver)[name]["environments"]["dev"]
    store = driver.defs.resources["artifacts"].store()
    files = store.read_bundle(good["artifact"])
    files["service/app.py"] += "\nraise SystemExit('broken release')\n"
    bad = store.put_bundle(files)
    result = driver.defs.resolve_job_def("deploy_dev").execute_in_process(
        instance=driver.instance, partition_key=name, tags={"codemind/artifact": bad}, raise_on_error=False)
    assert not result.success
    history = db.deployment_history(name)
    assert history[-1].artifact == bad and history[-1].status == "rolled_back"
    assert "broken release" in history[-1].detail
    assert db.live_deployments(name)[(name, "dev")].artifact == good["artifact"]
    assert httpx.get(f"{good['url']}/healthz", timeout=5).json() == {"status": "ok"}
    assert psutil.pid_exists(good["pid"])


def test_crashed_promotion_resumes_without_deploying_twice(driver, examples):
    import sqlalchemy as sa

    from codemind_dagster.resources.tables import deployments

    submit(driver, examples / "inventory-catalog.yaml")
    driver.run_until_idle()
    name = next(iter(status(driver)))
    db = driver.defs.resources["database"].client()
    live = db.live_deployments(name)[(name, "staging")]
    # A run that died after the cutover but before recording it: row 'deploying', promotion 'running'.
    failed = driver.defs.resolve_job_def("deploy_dev").execute_in_process(
        instance=driver.instance, partition_key=name, tags={"codemind/artifact": "0" * 64}, raise_on_error=False)
    assert not failed.success
    with db.tx() as c:
        c.execute(sa.update(deployments).where(deployments.c.id == live.id).values(status="deploying"))
    db.set_promotion(name, "staging", live.artifact, "running", run_id=failed.run_id)
    outcomes = driver.tick()
    assert [(o.job, o.success) for o in outcomes] == [("deploy_staging", True)]
    latest = db.deployment_history(name)[-1]
    assert (latest.environment, latest.status, latest.detail) == ("staging", "live", "unchanged")
    assert latest.pid == live.pid  # adopted the process that was already serving, not a second deploy
    promo = next(p for p in db.promotions(name) if p.environment == "staging")
    assert (promo.status, promo.attempts) == ("done", 2)
    assert driver.tick() == []


def test_down_holds_deployments_until_resumed(driver, examples):
    submit(driver, examples / "inventory-catalog.yaml")
    driver.run_until_idle()
    db = driver.defs.resources["database"].client()
    assert driver.defs.resources["runtime"].runtime().stop_all() == 3
    assert db.stop_deployments() == 3
    assert driver.tick() == []  # the promotion sensor does not undo `codemind down`
    assert status(driver)["inventory-catalog"]["state"] == "stopped"
    assert db.resume_stopped() == 3
    outcomes = driver.run_until_idle()
    assert [o.job for o in outcomes] == ["deploy_dev", "deploy_staging", "deploy_production"]
    assert status(driver)["inventory-catalog"]["state"] == "live"


def test_hostile_intent_in_the_inbox_changes_nothing(driver, examples, settings):
    settings.intents_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(examples / "inventory-catalog.yaml", settings.intents_dir)
    (settings.intents_dir / "evil.yaml").write_text("!!python/object/apply:os.system ['touch /tmp/pwned']\n")
    driver.run_until_idle()
    db = driver.defs.resources["database"].client()
    assert [r.name for r in db.intent_rows()] == ["inventory-catalog"]
    assert len(db.rejections()) == 1 and "python/object/apply" in db.rejections()[0].error
    assert driver.instance.get_dynamic_partitions("intents") == ["inventory-catalog"]
