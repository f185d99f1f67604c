"""Exact-match response caches for the model router: SQL (the platform DB) or Redis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from codemind_dagster.resources import tables as t
from codemind_dagster.resources.database import PlatformDB, now


@dataclass(frozen=True)
class CacheEntry:
    """What is stored beside a response, so a cache row says where it came from."""

    task: str
    provider: str
    model: str


class ResponseCache(Protocol):
    name: str

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The stored responses of the keys that hit (one round trip)."""
        ...

    def put(self, key: str, entry: CacheEntry, response: Any) -> None: ...


class CompiledSql:
    """A Core statement compiled once for one dialect and run on a raw DBAPI cursor (the SQLite hot path).

    Binds go through the same type processors SQLAlchemy would apply (datetimes, JSON, booleans), so the rows
    written and read are identical to the Core path, without compiling and building a result per call.
    """

    __slots__ = ("_literals", "_plan", "sql")

    def __init__(self, stmt: Any, dialect: Any, column_keys: Sequence[str] | None = None):
        compiled = stmt.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql = compiled.string
        names = tuple(compiled.positiontup or ())
        self._plan = tuple((n, _fast(compiled.binds[n].type._cached_bind_processor(dialect))) for n in names)
        # Values fixed at compile time (a literal in the statement); every other bind must come with the call.
        self._literals = {n: b.value for n in names if not (b := compiled.binds[n]).required and b.value is not None}

    def args(self, params: dict[str, Any]) -> list:
        v = {**self._literals, **params} if self._literals else params
        return [v[n] if p is None else p(v[n]) for n, p in self._plan]

    def execute(self, cursor: Any, params: dict[str, Any]) -> Any:
        return cursor.execute(self.sql, self.args(params))


@cache
def _key_names(n: int) -> tuple[str, ...]:
    return tuple(f"k{i}" for i in range(n))


def key_binds(keys: Sequence[str]) -> dict[str, str]:
    """The bind parameters :k0, :k1 ... that cache lookups by key use."""
    return dict(zip(_key_names(len(keys)), keys, strict=True))


_PROBE = datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=UTC)


def _fast(proc: Any) -> Any:
    """SQLAlchemy's bind processor, or an equal and faster one for datetimes stored as text (SQLite).

    SQLAlchemy formats each field through a dict; `isoformat` writes the same 26 characters. Used only when
    both agree on a probe value, so a custom storage format keeps the original.
    """
    if proc is None:
        return None
    try:
        if proc(_PROBE) != _PROBE.isoformat(" ", "microseconds")[:26]:
            return proc
    except Exception:  # noqa: BLE001 - not a datetime processor
        return proc

    def text(v: Any) -> Any:
        return v.isoformat(" ", "microseconds")[:26] if type(v) is datetime else proc(v)

    return text


_ONE = sa.select(t.llm_cache.c.key, t.llm_cache.c.response).where(t.llm_cache.c.key == sa.bindparam("key"))
_MANY = sa.select(t.llm_cache.c.key, t.llm_cache.c.response).where(
    t.llm_cache.c.key.in_(sa.bindparam("keys", expanding=True)))


class SqlResponseCache:
    """The `llm_cache` table of the platform database; rows live until deleted."""

    name = "sql"

    def __init__(self, db: PlatformDB):
        self.db = db
        dialect = db.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - the platform runs on SQLite and PostgreSQL only
            insert = None
        # A conflict means another run cached the same answer first: keeping either is correct.
        self._insert = insert(t.llm_cache).on_conflict_do_nothing(index_elements=["key"]) if insert else None
        # The SQLite hot path (the router's held connection): statements compiled once, run on the DBAPI cursor.
        self._raw_gets: dict[int, CompiledSql] = {}
        self._raw_put: CompiledSql | None = None
        self._response = t.llm_cache.c.response.type._cached_result_processor(db.engine.dialect, None)

    def _raw_get(self, n: int) -> CompiledSql:
        q = self._raw_gets.get(n)
        if q is None:
            d = self.db.engine.dialect
            key = t.llm_cache.c.key
            names = _key_names(n)
            q = CompiledSql(sa.select(key, t.llm_cache.c.response).where(
                key.in_([sa.bindparam(k) for k in names]) if n > 1 else key == sa.bindparam(names[0])), d)
            if len(self._raw_gets) < 64:
                self._raw_gets[n] = q
        return q

    def get_many_raw(self, cursor: Any, keys: Sequence[str]) -> dict[str, Any]:
        """`get_many` on a DBAPI cursor of a SQLite connection, inside the caller's transaction."""
        rows = self._raw_get(len(keys)).execute(cursor, key_binds(keys)).fetchall()
        return self.decode_raw([k for k, _ in rows], [v for _, v in rows])

    def decode_raw(self, keys: Sequence[str], stored: Sequence[Any]) -> dict[str, Any]:
        """The hits among `keys`, from raw `response` values read alongside (None: a miss)."""
        proc = self._response
        return {k: (proc(v) if proc is not None else v) for k, v in zip(keys, stored, strict=True) if v is not None}

    def put_raw(self, cursor: Any, key: str, entry: CacheEntry, response: Any, at: Any = None) -> None:
        """`put` on a DBAPI cursor of a SQLite connection, inside the caller's transaction; `at`: its time."""
        if self._raw_put is None:
            self._raw_put = CompiledSql(self._insert, self.db.engine.dialect,
                                        ["key", "task", "provider", "model", "response", "created_at"])
        self._raw_put.execute(cursor, {"key": key, "task": entry.task, "provider": entry.provider,
                                       "model": entry.model, "response": response, "created_at": at or now()})

    def get_many(self, keys: Sequence[str], conn: Connection | None = None) -> dict[str, Any]:
        """`conn`: run on the caller's connection (the router's), inside its transaction."""
        if conn is None:
            with self.db.engine.connect() as own:
                return self.get_many(keys, own)
        q = _ONE if len(keys) == 1 else _MANY
        return {k: v for k, v in conn.execute(q, {"key": keys[0]} if len(keys) == 1 else {"keys": list(keys)})}

    def put(self, key: str, entry: CacheEntry, response: Any, conn: Connection | None = None) -> None:
        if self._insert is None:  # pragma: no cover
            self.db.cache_put(key, task=entry.task, provider=entry.provider, model=entry.model, response=response)
            return
        if conn is None:
            with self.db.tx() as own:
                return self.put(key, entry, response, own)
        conn.execute(self._insert, {"key": key, "task": entry.task, "provider": entry.provider,
                                    "model": entry.model, "response": response, "created_at": now()})


class RedisResponseCache:
    """Redis strings with a TTL, shared by every process that points at the same server."""

    name = "redis"

    def __init__(self, url: str, ttl_s: float = 7 * 24 * 3600, *, prefix: str = "codemind:llm-cache:"):
        import redis  # only the Redis profile pays for the import

        self.url, self.ttl_s, self.prefix = url, ttl_s, prefix
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        values = self.client.mget([self.prefix + k for k in keys])
        return {k: json.loads(v)["response"] for k, v in zip(keys, values, strict=True) if v is not None}

    def put(self, key: str, entry: CacheEntry, response: Any) -> None:
        blob = json.dumps({"task": entry.task, "provider": entry.provider, "model": entry.model,
                           "response": response}, separators=(",", ":"))
        # nx: the first answer stored wins, as in the SQL cache; the envelope says where it came from.
        self.client.set(self.prefix + key, blob, ex=max(1, int(self.ttl_s)), nx=True)

    def delete_all(self) -> int:
        """Remove every key under this cache's prefix (tests and `cache clear`)."""
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=500))
        return self.client.delete(*keys) if keys else 0


class NoResponseCache:
    """Caching off: every call goes to a provider."""

    name = "off"

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return {}

    def put(self, key: str, entry: CacheEntry, response: Any) -> None:
        return None


def response_cache(db: PlatformDB, redis_url: str | None = None, ttl_s: float = 7 * 24 * 3600) -> ResponseCache:
    """Redis when a URL is configured, otherwise the platform database."""
    return RedisResponseCache(redis_url, ttl_s) if redis_url else SqlResponseCache(db)
