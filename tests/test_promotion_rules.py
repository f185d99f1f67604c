"""The pure promotion rules."""

from __future__ import annotations

from codemind_dagster.domain.promotion import next_step

ENVS = ["dev", "staging", "production"]


def step(**kw):
    args = dict(artifact="a2", environments=ENVS, require_approval=[], checks_passed=True, live={},
                approved=set(), failed={})
    return next_step(**{**args, **kw})


def test_first_environment_needs_passing_checks():
    assert step(checks_passed=False).action == "blocked"
    assert (step().action, step().environment) == ("deploy", "dev")


def test_environments_are_entered_in_order():
    d = step(live={"dev": "a2", "staging": "a1", "production": "a1"})
    assert (d.action, d.environment) == ("deploy", "staging")


def test_approval_gate_waits_then_releases():
    live = {"dev": "a2", "staging": "a2"}
    assert step(live=live, require_approval=["production"]).action == "await_approval"
    d = step(live=live, require_approval=["production"], approved={"production"})
    assert (d.action, d.environment) == ("deploy", "production")


def test_a_failed_environment_blocks_the_release():
    d = step(live={"dev": "a2"}, failed={"staging": "rolled back: unhealthy"})
    assert d.action == "blocked" and "rolled back" in d.reason


def test_done_when_live_everywhere_and_subsets_are_respected():
    assert step(live={e: "a2" for e in ENVS}).action == "done"
    d = step(environments=["dev", "production"], live={"dev": "a2"})
    assert (d.action, d.environment) == ("deploy", "production")
