"""The model router: the one door from agents to models, with retries, failover, cache, budgets and a ledger."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from codemind_dagster.domain.task import Task
from codemind_dagster.resources import tables as t
from codemind_dagster.resources.database import PlatformDB, now
from codemind_dagster.resources.llm.cache import (
    CacheEntry,
    CompiledSql,
    ResponseCache,
    SqlResponseCache,
    key_binds,
)
from codemind_dagster.resources.llm.errors import (
    FatalError,
    OutputError,
    ProviderUnavailable,
    SpendLimitError,
    TransientError,
)
from codemind_dagster.resources.llm.prices import Price, PriceTable, load_prices
from codemind_dagster.resources.llm.providers import Call, OfflineProvider, Provider
from codemind_dagster.resources.llm.usage import Usage, estimate_chars, estimate_tokens

O = TypeVar("O", bound=BaseModel)
log = logging.getLogger(__name__)

TASKS = ("intent_analysis", "planning", "coding", "test_writing", "repair")
ROUTING_MODES = ("offline", "providers")


class BudgetExceeded(RuntimeError):
    """A call that could exceed a budget was not made."""

    def __init__(self, budget: str, limit: float, spent: float, estimate: float):
        self.budget, self.limit, self.spent, self.estimate = budget, limit, spent, estimate
        super().__init__(f"{budget} budget of ${limit:.4f} would be exceeded: spent ${spent:.4f}, "
                         f"this call could cost up to ${estimate:.4f}; the call was not made")


class RouterError(RuntimeError):
    """No candidate could answer the task; the message says what each candidate did."""


@dataclass(frozen=True)
class Candidate:
    provider: str
    model: str
    tier: int = 1


OFFLINE_ROUTES: dict[str, list[Candidate]] = {
    task: [Candidate("offline", "deterministic", tier=9)] for task in TASKS
}

# Tiers are a judgement of quality for this platform's tasks (1 small ... 5 frontier); the router puts the
# cheapest candidate meeting the task's tier first, so the declared order only breaks price ties (the
# first-party API before the same model on a cloud).
_HAIKU = [Candidate("anthropic", "claude-haiku-4-5", 2),
          Candidate("bedrock", "global.anthropic.claude-haiku-4-5-20251001-v1:0", 2)]
_SONNET = [Candidate("anthropic", "claude-sonnet-4-5", 4),
           Candidate("bedrock", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", 4)]
_GPT41 = [Candidate("openai", "gpt-4.1", 3), Candidate("azure", "gpt-4.1", 3)]
_GPT41_MINI = [Candidate("openai", "gpt-4.1-mini", 2), Candidate("azure", "gpt-4.1-mini", 2)]
DEFAULT_ROUTES: dict[str, list[Candidate]] = {
    "intent_analysis": [Candidate("openai", "gpt-4o-mini", 1), *_GPT41_MINI, *_HAIKU],
    "planning": [*_GPT41_MINI, *_HAIKU, Candidate("openai", "o4-mini", 3), *_SONNET],
    "coding": [*_GPT41, *_SONNET, Candidate("anthropic", "claude-opus-4-5", 5)],
    "test_writing": [*_GPT41_MINI, *_HAIKU, *_GPT41, *_SONNET],
    "repair": [*_GPT41, *_SONNET, Candidate("anthropic", "claude-opus-4-5", 5)],
}


def routes_for(mode: str | None) -> dict[str, list[Candidate]]:
    """The routing table of a mode: "offline" (the local profile's default) or "providers"."""
    mode = (mode or "offline").strip().lower()
    if mode == "offline":
        return {k: list(v) for k, v in OFFLINE_ROUTES.items()}
    if mode == "providers":
        return {k: list(v) for k, v in DEFAULT_ROUTES.items()}
    raise ValueError(f"unknown LLM routing mode {mode!r}: use one of {', '.join(ROUTING_MODES)}")


def blended_price(p: Price) -> float:
    """USD per million tokens at a 3:1 input:output mix, the usual shape of these tasks."""
    return (3 * p.input + p.output) / 4


@cache
def _schema(output: type[BaseModel]) -> tuple[dict[str, Any], str]:
    """The JSON schema of an output type and its digest, computed once per process."""
    schema = output.model_json_schema()
    return schema, hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]


@cache
def _key_prefix(provider: str, model: str, task: str, version: str, digest: str, max_tokens: int,
                system: str) -> tuple[Any, bytes]:
    """The response-cache key's hash up to the prompt, and the text after it, once per task and candidate.

    A key is an exact match: sha256 of the sorted JSON of provider, model, task, schema version and digest,
    max_tokens, system prompt and prompt. Split around the prompt so a call hashes only its prompt.
    """
    fields = {"provider": provider, "model": model, "task": task, "schema": version, "schema_digest": digest,
              "max_tokens": max_tokens, "system": system}
    items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(fields.items())]
    before = [i for k, i in zip(sorted(fields), items, strict=True) if k < "prompt"]
    after = [i for k, i in zip(sorted(fields), items, strict=True) if k > "prompt"]
    head = "{" + "".join(f"{i}, " for i in before) + '"prompt": '
    return hashlib.sha256(head.encode()), ("".join(f", {i}" for i in after) + "}").encode()


def _hash_key(prefix: tuple[Any, bytes], prompt: str) -> str:
    h = prefix[0].copy()
    h.update(json.dumps(prompt).encode())
    h.update(prefix[1])
    return h.hexdigest()


class Cooldowns:
    """Consecutive transient failures per candidate; at the threshold the candidate sits out a while.

    Shared by every router of the process (the pipeline builds a router per step), guarded by a lock.
    After the cooldown one probe is allowed: a failure sends the candidate straight back to cooldown.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], int] = {}
        self._until: dict[tuple[str, str], float] = {}

    def remaining(self, key: tuple[str, str], now: float) -> float:
        if key not in self._until:  # the usual case, without the lock: a dict lookup is atomic
            return 0.0
        with self._lock:
            return max(0.0, self._until.get(key, 0.0) - now)

    def failure(self, key: tuple[str, str], now: float, threshold: int, cooldown_s: float) -> bool:
        """Count a transient failure; True when the candidate is now cooling down."""
        with self._lock:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            if n >= threshold:
                self._until[key] = now + cooldown_s
                return True
            return False

    def success(self, key: tuple[str, str]) -> None:
        # Every successful call lands here: take the lock only when there is something to clear.
        if key in self._failures or key in self._until:
            with self._lock:
                self._failures.pop(key, None)
                self._until.pop(key, None)

    def failures(self, key: tuple[str, str]) -> int:
        with self._lock:
            return self._failures.get(key, 0)


COOLDOWNS = Cooldowns()


_UNSET = object()
_FORKS = [0]  # bumped in a forked child: a connection opened before the fork belongs to the parent
if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork to detect
    os.register_at_fork(after_in_child=lambda: _FORKS.__setitem__(0, _FORKS[0] + 1))


class HeldConnection:
    """One platform-DB connection per thread, reused by every call of a router.

    Opening a SQLite connection (WAL setup, pragmas) costs about twenty times the ledger insert itself; each
    unit of work still commits at once, so an idle held connection holds no lock.
    """

    def __init__(self, db: PlatformDB):
        self.db = db
        self._local = threading.local()

    def _get(self) -> sa.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed or conn.invalidated or local.forks != _FORKS[0]:
            conn = self.db.engine.connect()
            local.conn, local.raw, local.forks = conn, None, _FORKS[0]
        return conn

    def _drop(self) -> None:
        conn, self._local.conn, self._local.raw = getattr(self._local, "conn", None), None, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is being discarded anyway
                conn.close()

    def run(self, work: Callable[[sa.Connection], Any]) -> Any:
        """`work` in one transaction; a connection the server dropped (PostgreSQL restart) is replaced once."""
        for attempt in (1, 2):
            conn = self._get()
            try:
                result = work(conn)
                conn.commit()
                return result
            except sa.exc.DBAPIError as e:
                self._drop()
                if attempt == 2 or not e.connection_invalidated:
                    raise
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # noqa: BLE001
                    self._drop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _raw(self) -> Any:
        local = self._local
        raw = getattr(local, "raw", None)
        if raw is None or local.forks != _FORKS[0]:
            conn = self._get()
            if conn.in_transaction():  # pragma: no cover - every unit of work ends its transaction
                conn.commit()
            raw = local.raw = conn.connection.dbapi_connection
        return raw

    def run_raw(self, work: Callable[[Any], Any], *, write: bool = False) -> Any:
        """`work(cursor)` on the DBAPI connection under the held one (SQLite only); `write`: in one transaction.

        The hot path of every call: no statement compilation or result objects. The held connection is idle
        between units of work (each `run` commits). Inside, the connection is in autocommit mode and the
        transaction is explicit, so BEGIN and COMMIT come from the statement cache instead of being prepared
        on every call; a read is one statement, one snapshot.
        """
        raw = self._raw()
        level = raw.isolation_level
        cur = raw.cursor()
        try:
            raw.isolation_level = None
            if write:
                cur.execute("BEGIN")
            result = work(cur)
            if raw.in_transaction:
                cur.execute("COMMIT")
            return result
        except BaseException:
            try:
                raw.rollback()
            except Exception:  # noqa: BLE001
                self._drop()
            raise
        finally:
            try:
                cur.close()
            except Exception:  # noqa: BLE001, S110 - closing a cursor cannot lose data
                pass
            raw.isolation_level = level

    def close(self) -> None:
        self._drop()


_LEDGER_INSERT = t.llm_ledger.insert()
_SPEND_CONDITIONS = {
    "intent": t.llm_ledger.c.intent == sa.bindparam("intent"),
    "daily": t.llm_ledger.c.at >= sa.bindparam("day"),
    "run": t.llm_ledger.c.run_id == sa.bindparam("run_id"),
}


@cache
def _spend_query(scopes: tuple[str, ...], since_id: bool = False, lookups: int = 0) -> sa.Select:
    """Spend of each scope and the ledger's newest id, in one statement (one round trip, one snapshot).

    Built once per shape; `since_id` restricts it to the rows after :last_id; `lookups` appends the cached
    responses of keys :k0 ... (NULL on a miss), so a cache miss costs one statement, budgets included.
    """
    conds = [_SPEND_CONDITIONS[s] for s in scopes]
    led = t.llm_ledger.c
    newest = sa.select(sa.func.max(led.id)).scalar_subquery()
    where = sa.or_(*conds)
    if since_id:
        where = sa.and_(led.id > sa.bindparam("last_id"), where)
    cached = (sa.select(t.llm_cache.c.response).where(t.llm_cache.c.key == sa.bindparam(k)).scalar_subquery()
              for k in key_binds(["?"] * lookups))
    zero = sa.literal_column("0")  # inline: a bound 0 per scope would cost a bind on every check
    return sa.select(newest, *(sa.func.coalesce(sa.func.sum(sa.case((c, led.cost_usd), else_=zero)), zero)
                               for c in conds), *cached).where(where)


class SpendTotals:
    """Budget spend per scope: the whole ledger once, then only the rows added since (SQLite).

    SQLite has one writer at a time and hands out rowids in commit order, so `id > last seen` is exactly
    the new rows and the running totals stay exact while the check costs the same at any ledger size.
    PostgreSQL sequences are not commit-ordered (a row can appear below an id already seen), so there
    every check sums the ledger.
    """

    def __init__(self, incremental: bool):
        self.incremental = incremental
        self._lock = threading.Lock()
        self._totals: dict[tuple, tuple[int, list[float]]] = {}

    def read(self, fetch: Callable[[sa.Select, dict[str, Any]], Any] | sa.Connection, kinds: tuple[str, ...],
             params: dict[str, Any], lookups: tuple[str, ...] = ()) -> Any:
        """Spend per scope; with `lookups` (cache keys), (spend, the stored response of each key or None).

        `fetch(statement, params)` runs a statement and returns its one row; a Connection works too.
        """
        if isinstance(fetch, sa.Connection):
            conn = fetch
            fetch = lambda q, p: conn.execute(q, p).one()
        n, m = len(kinds), len(lookups)
        binds = {**params, **key_binds(lookups)} if m else params
        if self.incremental:
            totals, row = self._advance(fetch, kinds, params, binds, m)
        else:
            row = fetch(_spend_query(kinds, False, m), binds)
            totals = [float(v or 0) for v in row[1:1 + n]]
        return (tuple(totals), tuple(row[1 + n:])) if m else tuple(totals)

    def _advance(self, fetch: Callable[[sa.Select, dict[str, Any]], Any], kinds: tuple[str, ...],
                 params: dict[str, Any], binds: dict[str, Any], m: int) -> tuple[list[float], Any]:
        n = len(kinds)
        key = (kinds, *sorted(params.items()))
        with self._lock:  # read and advance together, or two threads would add the same rows twice
            seen = self._totals.get(key)
            if seen is not None:
                row = fetch(_spend_query(kinds, True, m), {**binds, "last_id": seen[0]})
                newest = row[0] or 0
                if newest >= seen[0]:
                    totals = [a + float(b or 0) for a, b in zip(seen[1], row[1:1 + n], strict=True)]
                    self._totals[key] = (newest, totals)
                    return totals, row
                # The ledger went back (a restored database): start over from the whole ledger.
            row = fetch(_spend_query(kinds, False, m), binds)
            totals = [float(v or 0) for v in row[1:1 + n]]
            if len(self._totals) > 256:  # one entry per (intent, day, run): old days and runs age out
                self._totals.clear()
            self._totals[key] = (row[0] or 0, totals)
            return totals, row


@dataclass(frozen=True)
class _Scopes:
    """The budgets in force for one call: names, limits and the query parameters."""

    kinds: tuple[str, ...]
    names: tuple[str, ...]
    limits: tuple[float, ...]
    params: dict[str, Any]


class _FailOver(Exception):
    """This candidate is done for this call; try the next one."""


class _Skip(_FailOver):
    """The candidate turned out to be unavailable: it was skipped, not failed."""


@dataclass(frozen=True, slots=True)
class _Route:
    """One candidate of a task with what each call to it reuses: price, cache-key prefix, cache entry."""

    cand: Candidate
    price: Price
    key_prefix: tuple[Any, bytes]  # the cache key's hash up to the prompt, and the text after it
    entry: CacheEntry
    price_key: str

    def key(self, prompt: str) -> str:
        return _hash_key(self.key_prefix, prompt)


@dataclass(slots=True)
class _Run:
    """One `run` call: what the ledger rows share and what happened so far."""

    task: Task
    base: dict[str, Any]
    system: str
    context: str
    prompt: str
    schema: dict[str, Any]
    input_estimate: int
    intent: str | None
    run_id: str | None
    intent_budget_usd: float | None
    scopes: _Scopes | None = None
    spent: tuple[float, ...] | None = None  # read with the cache lookup; used by the first attempt only
    reasked: bool = False
    feedback: str | None = None
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class ModelRouter:
    db: PlatformDB
    providers: dict[str, Provider] | None = None
    routes: dict[str, list[Candidate]] | None = None
    prices: PriceTable = field(default_factory=load_prices)
    daily_budget_usd: float | None = None
    run_budget_usd: float | None = None
    routing: str | None = None  # "offline" or "providers"; ignored when `routes` is given
    cache: ResponseCache | None = None  # default: the platform database
    max_attempts: int = 3  # per candidate, for transient errors
    backoff_base_s: float = 1.0
    backoff_max_s: float = 20.0
    retry_after_max_s: float = 60.0  # a longer Retry-After fails over instead of sleeping
    cooldown_after: int = 3  # consecutive transient failures
    cooldown_s: float = 60.0
    cooldowns: Cooldowns = field(default_factory=lambda: COOLDOWNS)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        mode = (self.routing or "offline").strip().lower()
        if self.routes is None:
            self.routes = routes_for(mode)
        if self.providers is None:
            self.providers = default_providers(mode)
        if self.cache is None:
            self.cache = SqlResponseCache(self.db)
        self._availability: dict[str, tuple[float, bool, str]] = {}
        self._plans: dict[tuple, tuple[tuple[Candidate, ...], tuple[_Route, ...]]] = {}
        self._scope_memo: dict[tuple, _Scopes | None] = {}
        self._conn = HeldConnection(self.db)
        self._spend_totals = SpendTotals(incremental=self.db.engine.dialect.name == "sqlite")
        # The SQL cache shares the router's connection and transactions: lookup with the budget read,
        # insert with the ledger row.
        self._sql_cache = isinstance(self.cache, SqlResponseCache) and self.cache.db.engine is self.db.engine
        # SQLite: the hot-path statements are compiled once and run on the DBAPI cursor of the held connection.
        self._raw = self.db.engine.dialect.name == "sqlite"
        self._raw_sql: dict[Any, CompiledSql] = {}
        self._one_read = self._raw and self._sql_cache

    def _compiled(self, stmt: Any, column_keys: tuple[str, ...] | None = None) -> CompiledSql:
        q = self._raw_sql.get((stmt, column_keys))
        if q is None:
            q = self._raw_sql[(stmt, column_keys)] = CompiledSql(stmt, self.db.engine.dialect, column_keys)
        return q

    def _raw_one(self, cur: Any) -> Callable[[sa.Select, dict[str, Any]], Any]:
        return lambda q, p: self._compiled(q).execute(cur, p).fetchone()

    def close(self) -> None:
        """Release this thread's database connection (it is also released when the router is collected)."""
        self._conn.close()

    # -- routing ---------------------------------------------------------------------------------
    def candidates(self, task: Task) -> list[Candidate]:
        """Cheapest first (blended price) among the candidates that meet the task's quality tier."""
        eligible = [c for c in self.routes.get(task.name, []) if c.tier >= task.tier]
        missing = [f"{c.provider}/{c.model}" for c in eligible if f"{c.provider}/{c.model}" not in self.prices.models]
        if missing:
            # A silent $0 would let an unpriced model spend past every budget.
            raise RouterError(f"task {task.name!r} routes to {', '.join(missing)}, which price table "
                              f"{self.prices.version} does not price: add them to prices.json")
        return sorted(eligible, key=lambda c: blended_price(self.prices.models[f"{c.provider}/{c.model}"]))

    def _plan(self, task: Task) -> tuple[_Route, ...]:
        """The task's candidates in order with their prices and cache-key prefixes; rebuilt when routes or prices change."""
        sig = (task.name, task.tier, task.version, task.max_tokens, task.system, task.output)
        listed = tuple(self.routes.get(task.name) or ())
        known = self._plans.get(sig)
        models = self.prices.models
        if known is not None and known[0] == listed and all(models.get(r.price_key) is r.price for r in known[1]):
            return known[1]
        digest = _schema(task.output)[1]
        plan = tuple(_Route(c, models[f"{c.provider}/{c.model}"],
                            _key_prefix(c.provider, c.model, task.name, task.version, digest, task.max_tokens,
                                        task.system), CacheEntry(task.name, c.provider, c.model),
                            f"{c.provider}/{c.model}")
                     for c in self.candidates(task))
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[sig] = (listed, plan)
        return plan

    def run(self, task: Task, payload: BaseModel, *, intent: str | None = None, run_id: str | None = None,
            intent_budget_usd: float | None = None) -> O:
        plan = self._plan(task)
        if not plan:
            raise RouterError(f"no provider is routed for task {task.name!r} at tier {task.tier}")
        context, prompt = task.context(payload), task.render(payload)
        r = _Run(task=task, base={"run_id": run_id, "intent": intent, "task": task.name,
                                  "price_version": self.prices.version},
                 system=task.system, context=context, prompt=prompt, schema=_schema(task.output)[0],
                 input_estimate=estimate_chars(len(task.system) + len(context) + len(prompt)),
                 intent=intent, run_id=run_id, intent_budget_usd=intent_budget_usd)
        r.scopes = self._scopes(intent, run_id, intent_budget_usd)
        text = context + "\n" + prompt
        keys = [route.key(text) for route in plan]
        priced = any(route.price.output > 0 for route in plan)
        hit = self._cached(r, plan, keys, read_spend=priced)
        if hit is not None:
            return hit
        for route, key in zip(plan, keys, strict=True):
            cand = route.cand
            reason = self._skip_reason(cand)
            if reason:
                r.skipped.append(f"{cand.provider}/{cand.model} skipped: {reason}")
                continue
            try:
                return self._run_candidate(r, payload, route, key)
            except _Skip as e:
                r.skipped.append(f"{cand.provider}/{cand.model} skipped: {e}")
            except _FailOver as e:
                r.failures.append(f"{cand.provider}/{cand.model}: {e}")
        raise RouterError(f"task {task.name!r} failed on every candidate: " + "; ".join(r.failures + r.skipped))

    # -- one candidate: retries, re-ask, ledger ------------------------------------------------
    def _run_candidate(self, r: _Run, payload: BaseModel, route: _Route, key: str):
        cand, price = route.cand, route.price
        provider = self.providers[cand.provider]
        ck = (cand.provider, cand.model)
        base = {**r.base, "provider": cand.provider, "model": cand.model}
        transient = 0
        while True:
            call = Call(task=r.task, payload=payload, model=cand.model, system=r.system, context=r.context,
                        prompt=r.prompt, max_tokens=r.task.max_tokens, output_schema=r.schema, feedback=r.feedback)
            input_estimate = r.input_estimate + (estimate_tokens(r.feedback) if r.feedback else 0)
            estimate = price.worst_case(input_estimate, r.task.max_tokens)
            try:
                # Checked before every attempt, retries and the re-ask included: spend may have grown since.
                self._check_budgets(estimate, r.scopes, r.spent)
                r.spent = None
            except BudgetExceeded as e:
                self._record(base, price, Usage(), outcome="budget_blocked", latency_ms=0, error=str(e))
                raise
            started = time.perf_counter()
            try:
                completion = provider.complete(call)
            except ProviderUnavailable as e:
                self._availability.pop(cand.provider, None)
                raise _Skip(f"unavailable ({e})") from None
            except TransientError as e:
                transient += 1
                cooling = self.cooldowns.failure(ck, self.clock(), self.cooldown_after, self.cooldown_s)
                delay, why_not = self._backoff(transient, e.retry_after_s)
                retry = transient < self.max_attempts and not cooling and why_not is None
                self._record(base, price, _usage_of(e), outcome="retry" if retry else "error",
                             latency_ms=_ms(started), error=str(e))
                if not retry:
                    why = f"{transient} attempt(s) failed"
                    if why_not:
                        why += f", {why_not}"
                    if cooling:
                        why += (f", cooling down for {self.cooldown_s:g}s after {self.cooldowns.failures(ck)} "
                                f"consecutive transient failures")
                    raise _FailOver(f"{why}; last error: {e}") from None
                self.sleep(delay)
                continue
            except SpendLimitError as e:
                self._record(base, price, _usage_of(e), outcome="error", latency_ms=_ms(started), error=str(e))
                raise RouterError(f"task {r.task.name!r}: {cand.provider}/{cand.model} refused the call for "
                                  f"spend: {e}; not retried: raise the provider account's limit or add credit"
                                  ) from e
            except FatalError as e:
                self._record(base, price, _usage_of(e), outcome="error", latency_ms=_ms(started), error=str(e))
                # The same request fails the same way anywhere: failing over would only spend more.
                raise RouterError(f"task {r.task.name!r}: {cand.provider}/{cand.model} rejected the request: "
                                  f"{e}; not retried") from e
            except OutputError as e:
                self.cooldowns.success(ck)
                usage = _usage_of(e, fallback=Usage(
                    input_tokens=input_estimate,
                    output_tokens=estimate_tokens(e.raw) if e.raw else r.task.max_tokens))
                self._record(base, price, usage, outcome="invalid_output", latency_ms=_ms(started), error=str(e))
                self._reask(r, cand, f"the answer was not valid JSON: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a provider bug: this candidate is out, the next may work
                self._record(base, price, Usage(), outcome="error", latency_ms=_ms(started),
                             error=f"{type(e).__name__}: {e}")
                raise _FailOver(f"{type(e).__name__}: {e}") from None
            self.cooldowns.success(ck)
            try:
                out = r.task.output.model_validate(completion.output)
            except ValidationError as e:
                self._record(base, price, completion.usage, outcome="invalid_output", latency_ms=_ms(started),
                             error=str(e))
                self._reask(r, cand, f"the answer does not match the output schema: {e}")
                continue
            # The provider's JSON is what gets cached (no re-dump); a hit is validated again when read.
            self._record(base, price, completion.usage, outcome="ok", latency_ms=_ms(started),
                         cache=(key, route.entry, completion.output))
            return out

    def _reask(self, r: _Run, cand: Candidate, message: str) -> None:
        """Exactly one re-ask per call, with the validation error as feedback; then a clear failure."""
        if r.reasked:
            raise RouterError(f"task {r.task.name!r}: {cand.provider}/{cand.model} answered invalid output "
                              f"twice (re-asked once with the validation error): {message}")
        r.reasked = True
        r.feedback = message[:4000]

    def _backoff(self, attempt: int, retry_after_s: float | None) -> tuple[float, str | None]:
        """Capped exponential backoff with jitter, never shorter than the provider's Retry-After."""
        if retry_after_s is not None and retry_after_s > self.retry_after_max_s:
            return 0.0, f"retry-after {retry_after_s:g}s exceeds the {self.retry_after_max_s:g}s cap; failing over"
        exp = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay = exp * (0.5 + 0.5 * self.jitter())  # equal jitter: spread retries, keep a floor
        return max(delay, retry_after_s or 0.0), None

    def _skip_reason(self, cand: Candidate) -> str | None:
        provider = (self.providers or {}).get(cand.provider)
        if provider is None:
            return f"provider {cand.provider!r} is not configured"
        now = self.clock()
        left = self.cooldowns.remaining((cand.provider, cand.model), now)
        if left > 0:
            return (f"cooling down for another {left:.0f}s after {self.cooldowns.failures((cand.provider, cand.model))}"
                    f" consecutive transient failures")
        cached = self._availability.get(cand.provider)
        if cached is None or now - cached[0] > 30:
            ok, why = provider.available()
            cached = (now, ok, why)
            self._availability[cand.provider] = cached
        return None if cached[1] else f"unavailable ({cached[2]})"

    def _cached(self, r: _Run, plan: tuple[_Route, ...], key_list: list[str], *, read_spend: bool):
        """The best candidate's cached answer, or None; reads the budgets' spend in the same round trip."""
        started = time.perf_counter()
        if self._one_read and read_spend and r.scopes:  # SQLite: one statement for the lookup and the budgets
            r.spent, stored = self._conn.run_raw(lambda cur: self._spend(self._raw_one(cur), r.scopes, key_list))
            found = self.cache.decode_raw(key_list, stored)
        else:
            found = self._lookup(r, key_list, read_spend=read_spend)
        if not found:
            return None
        for route, key in zip(plan, key_list, strict=True):
            if key not in found:
                continue
            cand = route.cand
            try:
                out = r.task.output.model_validate(found[key])
            except ValidationError:
                continue  # an entry the current schema rejects is a miss, not an answer
            self._write(self._ledger_row({**r.base, "provider": cand.provider, "model": cand.model}, None, Usage(),
                                         outcome="ok", latency_ms=_ms(started), cache_hit=True))
            return out
        return None

    def _lookup(self, r: _Run, key_list: list[str], *, read_spend: bool) -> dict[str, Any]:
        """The cache lookup (and the budgets' spend on a miss) for every other pairing of database and cache."""
        found: dict[str, Any] = {}
        if not self._sql_cache:
            try:
                found = self.cache.get_many(key_list)
            except Exception as e:  # noqa: BLE001 - a cache outage degrades to provider calls
                log.warning("LLM response cache %s: get failed: %s", self.cache.name, e)

        def read(conn: Any) -> dict[str, Any]:
            if self._sql_cache:
                hits = (self.cache.get_many_raw(conn, key_list) if self._raw
                        else self.cache.get_many(key_list, conn=conn))
            else:
                hits = found
            if read_spend and r.scopes and not hits:
                r.spent = self._spend(self._raw_one(conn) if self._raw else conn, r.scopes)
            return hits

        if self._sql_cache or (read_spend and r.scopes and not found):
            found = self._conn.run_raw(read) if self._raw else self._conn.run(read)
        return found

    # -- ledger and budgets ---------------------------------------------------------------------
    @staticmethod
    def _ledger_row(base: dict[str, Any], price: Price | None, u: Usage, *, outcome: str, latency_ms: float,
                    error: str | None = None, cache_hit: bool = False) -> dict[str, Any]:
        return {**base, "at": now(), "input_tokens": u.input_tokens, "cache_write_tokens": u.cache_write_tokens,
                "cache_read_tokens": u.cache_read_tokens, "output_tokens": u.output_tokens,
                "reasoning_tokens": u.reasoning_tokens, "cost_usd": price.cost(u) if price else 0.0,
                "cache_savings_usd": price.cache_savings(u) if price else 0.0, "latency_ms": latency_ms,
                "outcome": outcome, "cache_hit": cache_hit, "error": error[:2000] if error else None}

    def _record(self, base: dict[str, Any], price: Price, u: Usage, *, outcome: str, latency_ms: float,
                error: str | None = None, cache: tuple[str, CacheEntry, Any] | None = None) -> None:
        self._write(self._ledger_row(base, price, u, outcome=outcome, latency_ms=latency_ms, error=error), cache)

    def _write(self, row: dict[str, Any], cache: tuple[str, CacheEntry, Any] | None = None) -> None:
        """One ledger row, committed before the answer is returned; a SQL cache entry rides in the same commit."""
        if self._raw:  # SQLite: statements compiled once, on the DBAPI cursor of the held connection
            ledger = self._compiled(_LEDGER_INSERT, tuple(row))
            run = lambda work: self._conn.run_raw(work, write=True)
            insert = lambda c: ledger.execute(c, row)
            put = lambda c, entry: self.cache.put_raw(c, *entry, row["at"])
        else:
            run = self._conn.run
            insert = lambda c: c.execute(_LEDGER_INSERT, row)
            put = lambda c, entry: self.cache.put(*entry, conn=c)
        if cache is not None and self._sql_cache:
            entry = cache
            try:
                run(lambda c: (insert(c), put(c, entry)))
                return
            except Exception as e:  # noqa: BLE001 - the answer is paid for: the ledger row must land alone
                log.warning("LLM response cache %s: put failed: %s", self.cache.name, e)
                cache = None
        run(insert)
        if cache is not None:
            try:
                self.cache.put(*cache)
            except Exception as e:  # noqa: BLE001 - a cache outage must not fail a paid-for answer
                log.warning("LLM response cache %s: put failed: %s", self.cache.name, e)

    def _scopes(self, intent: str | None, run_id: str | None, intent_budget_usd: float | None) -> _Scopes | None:
        memo = (intent, run_id, intent_budget_usd, self.daily_budget_usd, self.run_budget_usd)
        found = self._scope_memo.get(memo, _UNSET)
        if found is not _UNSET:
            return found
        if len(self._scope_memo) > 256:
            self._scope_memo.clear()
        found = self._scope_memo[memo] = self._new_scopes(intent, run_id, intent_budget_usd)
        return found

    def _new_scopes(self, intent: str | None, run_id: str | None, intent_budget_usd: float | None) -> _Scopes | None:
        scopes: list[tuple[str, str, float]] = []  # kind, name, limit
        params: dict[str, Any] = {}
        if intent is not None and intent_budget_usd is not None:
            scopes.append(("intent", f"intent {intent!r}", intent_budget_usd))
            params["intent"] = intent
        if self.daily_budget_usd is not None:
            scopes.append(("daily", "daily", self.daily_budget_usd))
            params["day"] = None  # set at each read: a run may cross midnight
        if run_id is not None and self.run_budget_usd is not None:
            scopes.append(("run", f"run {run_id[:8]}", self.run_budget_usd))
            params["run_id"] = run_id
        if not scopes:
            return None
        kinds, names, limits = zip(*scopes, strict=True)
        return _Scopes(kinds, names, limits, params)

    def _spend(self, conn: sa.Connection, scopes: _Scopes, lookups: tuple[str, ...] | list[str] = ()) -> Any:
        params = scopes.params
        if "day" in params:
            params = {**params, "day": _day_start()}
        return self._spend_totals.read(conn, scopes.kinds, params, tuple(lookups))

    def _check_budgets(self, estimate: float, scopes: _Scopes | None, spent: tuple[float, ...] | None = None) -> None:
        if estimate <= 0 or scopes is None:
            return  # a free (offline) call cannot exceed a budget, spent or not
        if spent is None:
            spent = (self._conn.run_raw(lambda c: self._spend(self._raw_one(c), scopes)) if self._raw
                     else self._conn.run(lambda c: self._spend(c, scopes)))
        for name, limit, used in zip(scopes.names, scopes.limits, spent, strict=True):
            # A spent budget stops every priced call, however small.
            if used + estimate > limit or used >= limit:
                raise BudgetExceeded(name, limit, used, estimate)


def default_providers(mode: str) -> dict[str, Provider]:
    """The offline provider, plus the configured real ones in "providers" mode."""
    providers: dict[str, Provider] = {"offline": OfflineProvider()}
    if mode == "providers":
        from codemind_dagster.resources.llm.config import ProviderConfig, build_providers

        providers.update(build_providers(ProviderConfig.from_env()))
    return providers


def _usage_of(exc: BaseException, fallback: Usage | None = None) -> Usage:
    """Tokens a failed attempt consumed, when the provider reported them (never under-count)."""
    usage = getattr(exc, "usage", None)
    return usage if isinstance(usage, Usage) else (fallback or Usage())


_DAY: tuple[int, datetime] = (-1, datetime.min.replace(tzinfo=UTC))


def _day_start() -> datetime:
    """Midnight UTC today, built once a day (a run may cross midnight: read at each check)."""
    global _DAY
    day = int(time.time() // 86400)
    if day != _DAY[0]:
        _DAY = (day, datetime.fromtimestamp(day * 86400, UTC))
    return _DAY[1]


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
