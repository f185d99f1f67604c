"""`codemind llm check`: providers, their readiness, the routing table in force and the price table."""

from __future__ import annotations

import json
import os
from typing import Any

import click


@click.group("llm")
def llm() -> None:
    """Model providers, routing and prices."""


@llm.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--routing", type=click.Choice(["offline", "providers"]), default=None,
              help="Show this routing mode instead of the configured one (CODEMIND_LLM_ROUTING).")
def check(as_json: bool, routing: str | None) -> None:
    """List providers (usable or why not), the routing table per task and the price table version.

    Read-only and offline: no model is called. The exit code is 0 whatever the report says.
    """
    report = collect(routing)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"routing mode: {report['routing']}   price table: {report['prices']['version']} "
               f"(dated {report['prices']['date'] or '-'}, {report['prices']['models']} models)")
    click.echo("providers:")
    for p in report["providers"]:
        click.echo(f"  {'ok ' if p['usable'] else 'no '} {p['name']:<10} {p['detail']}")
    click.echo("routes (tried in this order; cheapest candidate meeting the task's tier first):")
    for task, info in report["routes"].items():
        click.echo(f"  {task} (tier >= {info['tier'] if info['tier'] is not None else '-'}):")
        if info.get("error"):
            click.echo(f"    error: {info['error']}")
        for c in info["candidates"]:
            mark = "ok " if c["usable"] else "-- "
            click.echo(f"    {mark} {c['provider']}/{c['model']}  tier {c['tier']}  "
                       f"${c['blended_usd_per_mtok']:.3f}/MTok blended")
    click.echo("backends (role, backend in force, whether it answers):")
    for b in report["backends"]:
        state = "-- " if b["healthy"] is None else ("ok " if b["healthy"] else "no ")
        click.echo(f"  {state} {b['role']:<12} {b['backend']:<20} {b['detail']}")
    for w in report["warnings"]:
        click.echo(f"warning: {w}")


def collect(routing: str | None = None) -> dict[str, Any]:
    from codemind_dagster.resources.llm.prices import load_prices
    from codemind_dagster.resources.llm.providers import OfflineProvider
    from codemind_dagster.resources.llm.router import Candidate, blended_price, routes_for
    from codemind_dagster.settings import Settings

    settings = Settings.from_env()
    mode = routing or getattr(settings, "llm_routing", None) or "offline"
    prices = load_prices()
    warnings: list[str] = []
    providers: dict[str, Any] = {"offline": OfflineProvider()}
    try:
        from codemind_dagster.resources.llm.config import ProviderConfig, build_providers

        providers.update(build_providers(ProviderConfig.from_env()))
    except ImportError as e:
        warnings.append(f"real providers are not available in this build: {e}")
    except Exception as e:  # noqa: BLE001 - a configuration error is a finding of the check, not a crash
        warnings.append(f"provider configuration is invalid: {e}")
    status = []
    usable: dict[str, bool] = {}
    for name, p in providers.items():
        try:
            ok, detail = p.available()
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"{type(e).__name__}: {e}"
        usable[name] = ok
        status.append({"name": name, "usable": ok, "detail": detail})
    table = routes_for(mode)
    custom = getattr(settings, "llm_routes", None)  # CODEMIND_LLM_ROUTES, a team's own table (JSON)
    if custom and mode == "providers":
        try:
            from codemind_dagster.resources.llm.routes_config import parse_routes

            table = parse_routes(custom)
        except (ImportError, ValueError) as e:
            warnings.append(f"CODEMIND_LLM_ROUTES is not used: {e}")
    tiers = _task_tiers()
    routes: dict[str, Any] = {}
    for task, cands in table.items():
        tier = tiers.get(task)
        eligible = [c for c in cands if tier is None or c.tier >= tier]
        entry: dict[str, Any] = {"tier": tier, "candidates": []}
        unpriced = [c for c in eligible if f"{c.provider}/{c.model}" not in prices.models]
        if unpriced:
            entry["error"] = "not in the price table: " + ", ".join(f"{c.provider}/{c.model}" for c in unpriced)
        priced: list[Candidate] = sorted((c for c in eligible if c not in unpriced),
                                         key=lambda c: blended_price(prices.models[f"{c.provider}/{c.model}"]))
        for c in priced:
            entry["candidates"].append({
                "provider": c.provider, "model": c.model, "tier": c.tier, "usable": usable.get(c.provider, False),
                "blended_usd_per_mtok": round(blended_price(prices.models[f"{c.provider}/{c.model}"]), 4)})
        if priced and not any(c["usable"] for c in entry["candidates"]):
            warnings.append(f"task {task!r} has no usable candidate in routing mode {mode!r}")
        routes[task] = entry
    return {"routing": mode, "providers": status, "routes": routes, "warnings": warnings,
            "prices": {"version": prices.version, "date": prices.date, "models": len(prices.models)},
            "backends": backend_report(settings)}


def backend_report(settings) -> list[dict[str, Any]]:
    """Each role's backend, probed when it is a production store (embedded ones answer with the DB)."""
    from codemind_dagster.resources.backends import Backends
    from codemind_dagster.resources.probes import DEFAULT_TIMEOUT_S, NEO4J_PASSWORD_ENV, probe_backends

    backends = Backends.from_settings(settings)
    password = os.environ.get(NEO4J_PASSWORD_ENV)
    probes = {p["name"]: p for p in probe_backends(backends, DEFAULT_TIMEOUT_S, password)}
    rows = []
    for b in backends.active():
        p = probes.get(b["role"])
        rows.append({**b, "healthy": p["healthy"] if p and p.get("probed", True) else None,
                     "detail": p["detail"] if p else f"{b['target']} (embedded default)"})
    return rows


def _task_tiers() -> dict[str, int]:
    """The tier each agent task asks for, from the task definitions themselves."""
    from codemind_dagster.agents.coding import CODE_TASK
    from codemind_dagster.agents.intent_engine import INTENT_TASK
    from codemind_dagster.agents.planning import PLAN_TASK
    from codemind_dagster.agents.repair import REPAIR_TASK
    from codemind_dagster.agents.testing import CONTRACT_TASK

    return {t.name: t.tier for t in (INTENT_TASK, PLAN_TASK, CODE_TASK, CONTRACT_TASK, REPAIR_TASK)}
