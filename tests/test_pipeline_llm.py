"""The delivery pipeline on the real SDKs against local stand-ins: Anthropic, failover, budget, repair."""

from __future__ import annotations

import json

import pytest
from llm_standin import StandIn, offline_solver

from codemind_dagster.driver import Driver
from codemind_dagster.settings import Settings

pytestmark = pytest.mark.slow
TASKS = ("planning", "coding", "test_writing", "repair")


@pytest.fixture
def drive(monkeypatch, runtime_cleanup):
    """Builds a Driver once the test has pointed the environment at its stand-ins."""
    drivers = []

    def make(env: dict[str, str], routes: dict | None = None) -> Driver:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("CODEMIND_LLM_ROUTING", "providers")
        if routes:
            monkeypatch.setenv("CODEMIND_LLM_ROUTES", json.dumps(routes))
        drivers.append(Driver(Settings.from_env(), progress=lambda m: None))
        return drivers[-1]

    yield make
    for d in drivers:
        d.instance.dispose()


def only(prefix: str, env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(prefix)}


def with_budget(examples, tmp_path, usd: str):
    """The inventory sample with another intent budget."""
    text = (examples / "inventory-catalog.yaml").read_text()
    assert "llm_usd: 1.00" in text
    path = tmp_path / f"budget-{usd}.yaml"
    path.write_text(text.replace("llm_usd: 1.00", f"llm_usd: {usd}"))
    return path


def deliver(driver: Driver, path) -> tuple[bool, object]:
    name = driver.defs.resources["intent_store"].store().submit(path).name
    driver.instance.add_dynamic_partitions("intents", [name])
    result = driver.defs.resolve_job_def("deliver_intent").execute_in_process(
        instance=driver.instance, partition_key=name, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    return result.success, result


def test_whole_pipeline_to_production_on_anthropic(drive, examples):
    with StandIn() as s:
        driver = drive(only("ANTHROPIC_", s.env()))
        driver.defs.resources["intent_store"].store().submit(examples / "inventory-catalog.yaml")
        outcomes = driver.run_until_idle()
        assert outcomes and all(o.success for o in outcomes), [o.error for o in outcomes]
        db = driver.defs.resources["database"].client()
        ok = [c for c in db.llm_calls(intent="inventory-catalog") if c.outcome == "ok" and not c.cache_hit]
        assert {c.task for c in ok} == {"planning", "coding", "test_writing"}
        assert {c.provider for c in ok} == {"anthropic"} and all(float(c.cost_usd) > 0 for c in ok)
        # Each task has its own tool and system prompt, so each writes its own cache prefix.
        assert all(c.cache_write_tokens > 0 for c in ok)
        assert {r.path for r in s.requests} == {"/v1/messages"}
        assert all(r.json["tool_choice"]["type"] == "tool" for r in s.requests)
        live = db.live_deployments("inventory-catalog")
        assert {env for (_, env) in live} == {"dev", "staging", "production"}


def test_a_429_storm_on_anthropic_finishes_on_openai(drive, examples):
    with StandIn() as storm, StandIn() as good:
        for _ in range(60):
            storm.error(429, headers={"retry-after-ms": "5"})
        driver = drive({**only("ANTHROPIC_", storm.env()), **only("OPENAI_", good.env())},
                       routes={t: [["anthropic", "claude-haiku-4-5", 5], ["openai", "gpt-4.1", 5]] for t in TASKS})
        ok, _ = deliver(driver, examples / "inventory-catalog.yaml")
        assert ok
        calls = driver.defs.resources["database"].client().llm_calls(intent="inventory-catalog")
        assert {c.provider for c in calls if c.outcome == "ok"} == {"openai"}
        assert any(c.provider == "anthropic" and c.outcome != "ok" for c in calls)
        assert storm.requests and all(r.path == "/v1/messages" for r in storm.requests)
        # Cooldown: after the first task fails over, later tasks do not hammer Anthropic again.
        assert len(storm.requests) <= 6


def test_a_too_small_budget_stops_before_the_call_that_would_exceed_it(drive, examples, tmp_path):
    intent = with_budget(examples, tmp_path, "0.10")
    with StandIn() as s:
        driver = drive(only("ANTHROPIC_", s.env()))
        ok, result = deliver(driver, intent)
        assert not ok
        db = driver.defs.resources["database"].client()
        error = db.intent_row("inventory-catalog").error
        assert error.startswith("generated_code:") and "intent 'inventory-catalog' budget of $0.1000" in error
        assert "the call was not made" in error
        assert not any(r.json["tool_choice"]["name"].endswith("coding") for r in s.requests)
        assert 0 < db.llm_spend(intent="inventory-catalog") <= 0.10  # planning ran, coding did not


def test_failing_code_is_repaired_and_the_repair_is_costed(drive, examples, tmp_path):
    repairs_seen = []

    def solver(body: dict) -> dict:
        out = offline_solver(body)
        tool = body.get("tool_choice", {}).get("name", "")
        bug = None
        if tool.endswith("coding"):
            bug = "status_code=200"  # a first draft with a bug
        elif tool.endswith("repair"):
            repairs_seen.append(tool)
            bug = "status_code=202" if len(repairs_seen) == 1 else None  # the first repair misses it too
        if bug:
            app = out["files"]["service/app.py"]
            assert "status_code=201" in app
            out = {**out, "files": {**out["files"], "service/app.py": app.replace("status_code=201", bug)}}
        return out

    with StandIn(solver=solver) as s:
        driver = drive(only("ANTHROPIC_", s.env()))
        ok, result = deliver(driver, with_budget(examples, tmp_path, "5.00"))
        mat = result.asset_materializations_for_node("test_results")[0]
        assert ok, (mat.metadata["repairs"].value, mat.metadata["failures"].value)
        rounds = mat.metadata["repairs"].value
        assert "round 1" in rounds and "round 2" in rounds and rounds.rstrip().endswith("0 failed")
        release = result.asset_materializations_for_node("release_candidate")[0]
        assert release.metadata["repaired"].value is True
        repairs = [c for c in driver.defs.resources["database"].client().llm_calls(task="repair")]
        assert len(repairs) == 2 and all(float(c.cost_usd) > 0 for c in repairs)
        # The second round reuses the cached system prompt and intent: cheaper, and the ledger says by how much.
        assert repairs[1].cache_read_tokens > 0 and float(repairs[1].cache_savings_usd) > 0
