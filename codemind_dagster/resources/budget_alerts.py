"""Budget alerts and blocks over the LLM ledger: plain SQL, importable by the router without Dagster."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from codemind_dagster.resources import tables as t
from codemind_dagster.resources.database import PlatformDB, as_utc

THRESHOLDS: tuple[int, ...] = (80, 100)
BLOCK_THRESHOLD = 100


def daily_scope(day: date) -> str:
    return f"daily:{day.isoformat()}"


def intent_scope(name: str) -> str:
    return f"intent:{name}"


def utc_day(now: datetime | None = None) -> date:
    return (as_utc(now) or datetime.now(UTC)).astimezone(UTC).date()


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _dec(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value or 0))


@dataclass(frozen=True)
class BudgetState:
    scope: str
    spend_usd: Decimal
    budget_usd: Decimal

    @property
    def percent(self) -> float:
        return float(self.spend_usd / self.budget_usd * 100) if self.budget_usd > 0 else 0.0

    def crossed(self, threshold: int) -> bool:
        return self.budget_usd > 0 and self.spend_usd * 100 >= self.budget_usd * threshold


def intent_budgets(conn: Connection, names: Iterable[str] | None = None) -> dict[str, Decimal]:
    """spec.budget.llm_usd of every intent that has one (the spec JSON is read in Python: few rows, any dialect)."""
    q = sa.select(t.intents.c.name, t.intents.c.spec)
    if names is not None:
        q = q.where(t.intents.c.name.in_(list(names)))
    out = {}
    for name, spec in conn.execute(q):
        budget = ((spec or {}).get("spec") or {}).get("budget") or {}
        if budget.get("llm_usd") is not None:
            out[name] = _dec(budget["llm_usd"])
    return out


def spend_between(conn: Connection, start: datetime, end: datetime) -> Decimal:
    led = t.llm_ledger.c
    q = sa.select(sa.func.coalesce(sa.func.sum(led.cost_usd), 0)).where(led.at >= start, led.at < end)
    return _dec(conn.execute(q).scalar())


def intent_spend(conn: Connection, names: Iterable[str], until: datetime | None = None) -> dict[str, Decimal]:
    """Lifetime spend per intent (what the router's per-intent budget counts), optionally up to `until`."""
    names = list(names)
    if not names:
        return {}
    led = t.llm_ledger.c
    q = (sa.select(led.intent, sa.func.coalesce(sa.func.sum(led.cost_usd), 0))
         .where(led.intent.in_(names)).group_by(led.intent))
    if until is not None:
        q = q.where(led.at < until)
    spent = {name: _dec(total) for name, total in conn.execute(q)}
    return {name: spent.get(name, Decimal(0)) for name in names}


def budget_states(db: PlatformDB, now: datetime | None = None, *,
                  daily_budget_usd: float | None = None) -> list[BudgetState]:
    """Today's spend against the daily budget and each intent's spend against its own budget."""
    today = utc_day(now)
    start = day_start(today)
    states = []
    with db.engine.connect() as c:
        if daily_budget_usd is not None:
            states.append(BudgetState(daily_scope(today), spend_between(c, start, start + timedelta(days=1)),
                                      _dec(daily_budget_usd)))
        budgets = intent_budgets(c)
        for name, spent in sorted(intent_spend(c, budgets).items()):
            states.append(BudgetState(intent_scope(name), spent, budgets[name]))
    return states


def record_alerts(db: PlatformDB, states: Iterable[BudgetState], now: datetime | None = None) -> list[dict[str, Any]]:
    """Insert an alert the first time a scope crosses each threshold; returns the new ones.

    A scope alerts once per threshold; when its budget has changed since, the alert is re-armed (updated).
    """
    at = as_utc(now) or datetime.now(UTC)
    al = t.budget_alerts.c
    new = []
    with db.tx() as c:
        existing = {(r.scope, r.threshold_percent): _dec(r.budget_usd)
                    for r in c.execute(sa.select(al.scope, al.threshold_percent, al.budget_usd))}
        for s in states:
            for threshold in THRESHOLDS:
                if not s.crossed(threshold):
                    continue
                key = (s.scope, threshold)
                values = {"spend_usd": s.spend_usd, "budget_usd": s.budget_usd, "at": at}
                if key not in existing:
                    c.execute(t.budget_alerts.insert().values(scope=s.scope, threshold_percent=threshold, **values))
                elif existing[key] != s.budget_usd:
                    c.execute(t.budget_alerts.update().where(
                        (al.scope == s.scope) & (al.threshold_percent == threshold)).values(**values))
                else:
                    continue
                new.append({"scope": s.scope, "threshold_percent": threshold, "spend_usd": float(s.spend_usd),
                            "budget_usd": float(s.budget_usd), "percent": round(s.percent, 1)})
    return new


def active_blocks(db: PlatformDB, now: datetime | None = None, *,
                  daily_budget_usd: float | None = None) -> set[str]:
    """Scopes whose LLM calls must fail fast: today's daily scope or intents at >= 100% of budget.

    Candidates are the 100% alerts the budget sensor recorded (one indexed read of a small table); each is
    confirmed against live spend and the budget in force now, so raising a budget, or a new UTC day (a new
    daily scope), lifts the block at once. `daily_budget_usd` is the budget in force; without it the
    alert's recorded budget is used.
    """
    today = utc_day(now)
    al = t.budget_alerts.c
    blocked: set[str] = set()
    with db.engine.connect() as c:
        rows = list(c.execute(sa.select(al.scope, al.budget_usd).where(
            (al.threshold_percent == BLOCK_THRESHOLD)
            & ((al.scope == daily_scope(today)) | al.scope.like("intent:%")))))
        if not rows:
            return blocked
        intents = {r.scope.split(":", 1)[1]: r for r in rows if r.scope.startswith("intent:")}
        daily = [r for r in rows if r.scope == daily_scope(today)]
        if daily:
            budget = _dec(daily_budget_usd) if daily_budget_usd is not None else _dec(daily[0].budget_usd)
            start = day_start(today)
            state = BudgetState(daily[0].scope, spend_between(c, start, start + timedelta(days=1)), budget)
            if state.crossed(BLOCK_THRESHOLD):
                blocked.add(state.scope)
        if intents:
            budgets = intent_budgets(c, intents)
            for name, spent in intent_spend(c, budgets).items():
                if BudgetState(intent_scope(name), spent, budgets[name]).crossed(BLOCK_THRESHOLD):
                    blocked.add(intent_scope(name))
    return blocked


def alerts_for_status(db: PlatformDB, now: datetime | None = None, *, daily_budget_usd: float | None = None,
                      limit: int = 50) -> list[dict[str, Any]]:
    """Recent budget alerts, newest first, each marked `blocking` when its scope refuses LLM calls now."""
    al = t.budget_alerts.c
    with db.engine.connect() as c:
        rows = list(c.execute(sa.select(t.budget_alerts).order_by(al.at.desc(), al.id.desc()).limit(limit)))
    blocks = active_blocks(db, now, daily_budget_usd=daily_budget_usd) if rows else set()
    return [{
        "scope": r.scope, "threshold_percent": r.threshold_percent, "spend_usd": float(r.spend_usd),
        "budget_usd": float(r.budget_usd), "at": as_utc(r.at).isoformat(),
        "blocking": r.threshold_percent == BLOCK_THRESHOLD and r.scope in blocks,
    } for r in rows]
