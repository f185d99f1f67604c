"""Promotion rules: which environment a release may enter next, and why not otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codemind_dagster.domain.loadtest import is_gate_hold

Action = Literal["deploy", "await_approval", "await_dr", "done", "blocked", "slo_failed"]


@dataclass(frozen=True)
class Decision:
    action: Action
    environment: str | None
    reason: str


def next_step(
    *,
    artifact: str,
    environments: list[str],
    require_approval: list[str],
    checks_passed: bool,
    live: dict[str, str],
    approved: set[str],
    failed: dict[str, str],
    dr_hold: str | None = None,
) -> Decision:
    """The next promotion step of one release.

    `live` maps environment -> artifact live there; `approved` holds the environments approved for
    this artifact; `failed` maps environment -> reason for environments where this artifact failed (or that
    the staging load test closed to it: an SLO it missed); `dr_hold` says why production must wait for a
    disaster-recovery drill, if it must.
    """
    if not checks_passed:
        return Decision("blocked", environments[0], "blocking checks have not all passed")
    previous = None
    for env in environments:
        if live.get(env) == artifact:
            previous = env
            continue
        if env in failed and is_gate_hold(failed[env]):
            return Decision("slo_failed", env, failed[env])
        if env in failed:
            return Decision("blocked", env, f"deploy to {env} failed: {failed[env]}")
        if env == "production" and dr_hold:
            return Decision("await_dr", env, dr_hold)
        if env in require_approval and env not in approved:
            return Decision("await_approval", env, f"{env} requires approval: codemind approve INTENT {env}")
        return Decision("deploy", env, "previous environment healthy" if previous else "checks passed")
    return Decision("done", environments[-1], "live in every environment")
