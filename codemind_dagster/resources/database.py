"""The platform database: engine, migrations and the queries the platform runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from codemind_dagster.resources import tables as t

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_ENGINES: dict[str, Engine] = {}


def now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def engine_for(url: str) -> Engine:
    """One engine per URL per process; SQLite gets WAL and a busy timeout for concurrent runs."""
    if url in _ENGINES:
        return _ENGINES[url]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, poolclass=sa.pool.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    _ENGINES[url] = engine
    return engine


class PlatformDB:
    """Repository over the platform tables; the same code runs on SQLite and PostgreSQL."""

    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("select version_num from alembic_version")).scalar()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- intents -----------------------------------------------------------------------------
    def upsert_intent(self, name: str, spec_hash: str, spec: dict[str, Any], source: str) -> str:
        """Record a valid intent; returns 'new', 'changed' or 'unchanged'."""
        with self.tx() as c:
            row = c.execute(sa.select(t.intents.c.spec_hash).where(t.intents.c.name == name)).first()
            if row is None:
                c.execute(t.intents.insert().values(
                    name=name, spec_hash=spec_hash, spec=spec, source=source, submitted_at=now()))
                return "new"
            if row.spec_hash == spec_hash:
                return "unchanged"
            c.execute(t.intents.update().where(t.intents.c.name == name).values(
                spec_hash=spec_hash, spec=spec, source=source, submitted_at=now(), error=None, error_at=None))
            return "changed"

    def intent_rows(self) -> list[sa.Row]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(t.intents).order_by(t.intents.c.name)))

    def intent_row(self, name: str) -> sa.Row | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(t.intents).where(t.intents.c.name == name)).first()

    def mark_requested(self, name: str, spec_hash: str) -> None:
        with self.tx() as c:
            c.execute(t.intents.update().where(t.intents.c.name == name).values(
                requested_hash=spec_hash, requested_at=now()))

    def clear_request(self, name: str) -> None:
        """Forget that the current spec was requested, so the intent sensor asks for its pipeline again."""
        with self.tx() as c:
            c.execute(t.intents.update().where(t.intents.c.name == name).values(requested_hash=None))

    def set_intent_error(self, name: str, error: str | None) -> None:
        with self.tx() as c:
            c.execute(t.intents.update().where(t.intents.c.name == name).values(
                error=error, error_at=now() if error else None))

    def reject_file(self, file: str, file_hash: str, error: str) -> None:
        with self.tx() as c:
            c.execute(t.rejected_intents.delete().where(t.rejected_intents.c.file == file))
            c.execute(t.rejected_intents.insert().values(file=file, file_hash=file_hash, error=error, at=now()))

    def clear_rejection(self, file: str) -> None:
        with self.tx() as c:
            c.execute(t.rejected_intents.delete().where(t.rejected_intents.c.file == file))

    def rejections(self) -> list[sa.Row]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(t.rejected_intents).order_by(t.rejected_intents.c.file)))

    # -- tests and releases ---------------------------------------------------------------------
    def save_test_run(self, intent: str, artifact: str, report: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute(t.test_runs.delete().where(
                (t.test_runs.c.intent == intent) & (t.test_runs.c.artifact == artifact)))
            c.execute(t.test_runs.insert().values(intent=intent, artifact=artifact, report=report, at=now()))

    def latest_test_run(self, intent: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(t.test_runs.c.report).where(t.test_runs.c.intent == intent)
                             .order_by(t.test_runs.c.at.desc()).limit(1)).scalar()

    def test_run(self, intent: str, artifact: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(t.test_runs.c.report).where(
                (t.test_runs.c.intent == intent) & (t.test_runs.c.artifact == artifact))).scalar()

    def add_release(self, intent: str, artifact: str, spec_hash: str, run_id: str | None) -> None:
        with self.tx() as c:
            c.execute(t.releases.insert().values(
                intent=intent, artifact=artifact, spec_hash=spec_hash, run_id=run_id, created_at=now()))

    def latest_release(self, intent: str) -> sa.Row | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(t.releases).where(t.releases.c.intent == intent)
                             .order_by(t.releases.c.id.desc()).limit(1)).first()

    # -- deployments, promotions, approvals --------------------------------------------------
    def start_deployment(self, intent: str, env: str, artifact: str, run_id: str | None) -> int:
        with self.tx() as c:
            return c.execute(t.deployments.insert().values(
                intent=intent, environment=env, artifact=artifact, status="deploying",
                run_id=run_id, started_at=now())).inserted_primary_key[0]

    def finish_deployment(self, dep_id: int, status: str, *, url: str | None = None,
                          pid: int | None = None, detail: str | None = None) -> None:
        with self.tx() as c:
            row = c.execute(sa.select(t.deployments).where(t.deployments.c.id == dep_id)).one()
            if status == "live":
                c.execute(t.deployments.update().where(
                    (t.deployments.c.intent == row.intent) & (t.deployments.c.environment == row.environment)
                    & (t.deployments.c.status == "live") & (t.deployments.c.id != dep_id)
                ).values(status="superseded"))
            c.execute(t.deployments.update().where(t.deployments.c.id == dep_id).values(
                status=status, url=url, pid=pid, detail=detail, finished_at=now()))

    def live_deployments(self, intent: str | None = None) -> dict[tuple[str, str], sa.Row]:
        """The live deployment of every (intent, environment)."""
        q = sa.select(t.deployments).where(t.deployments.c.status == "live")
        if intent:
            q = q.where(t.deployments.c.intent == intent)
        with self.engine.connect() as c:
            return {(r.intent, r.environment): r for r in c.execute(q.order_by(t.deployments.c.id))}

    def deployment_history(self, intent: str) -> list[sa.Row]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(t.deployments).where(t.deployments.c.intent == intent)
                                  .order_by(t.deployments.c.id)))

    def stop_deployments(self) -> int:
        """Mark every live deployment stopped; they stay down until resume_stopped()."""
        with self.tx() as c:
            live = list(c.execute(sa.select(t.deployments).where(t.deployments.c.status == "live")))
            for r in live:
                c.execute(t.promotions.update().where(
                    (t.promotions.c.intent == r.intent) & (t.promotions.c.environment == r.environment)
                    & (t.promotions.c.artifact == r.artifact)).values(status="stopped", updated_at=now()))
            c.execute(t.deployments.update().where(t.deployments.c.status == "live").values(
                status="stopped", finished_at=now()))
            return len(live)

    def resume_stopped(self) -> int:
        """Let the promotion sensor redeploy what `codemind down` stopped."""
        with self.tx() as c:
            return c.execute(t.promotions.update().where(t.promotions.c.status == "stopped").values(
                status="resume", updated_at=now())).rowcount

    def request_promotion(self, intent: str, env: str, artifact: str) -> int | None:
        """Record a promotion request once per (intent, env, artifact); None if it already exists."""
        with self.tx() as c:
            exists = c.execute(sa.select(t.promotions.c.id).where(
                (t.promotions.c.intent == intent) & (t.promotions.c.environment == env)
                & (t.promotions.c.artifact == artifact))).first()
            if exists:
                return None
            return c.execute(t.promotions.insert().values(
                intent=intent, environment=env, artifact=artifact, status="requested", attempts=1,
                requested_at=now(), updated_at=now())).inserted_primary_key[0]

    def retry_promotion(self, promo_id: int) -> int:
        with self.tx() as c:
            c.execute(t.promotions.update().where(t.promotions.c.id == promo_id).values(
                status="requested", attempts=t.promotions.c.attempts + 1, updated_at=now()))
            return c.execute(sa.select(t.promotions.c.attempts).where(t.promotions.c.id == promo_id)).scalar()

    def set_promotion(self, intent: str, env: str, artifact: str, status: str, *,
                      run_id: str | None = None, detail: str | None = None) -> None:
        values: dict[str, Any] = {"status": status, "updated_at": now(), "detail": detail}
        if run_id:
            values["run_id"] = run_id
        with self.tx() as c:
            c.execute(t.promotions.update().where(
                (t.promotions.c.intent == intent) & (t.promotions.c.environment == env)
                & (t.promotions.c.artifact == artifact)).values(**values))

    def promotions(self, intent: str | None = None) -> list[sa.Row]:
        q = sa.select(t.promotions).order_by(t.promotions.c.id)
        if intent:
            q = q.where(t.promotions.c.intent == intent)
        with self.engine.connect() as c:
            return list(c.execute(q))

    def approve(self, intent: str, env: str, artifact: str, by: str) -> bool:
        with self.tx() as c:
            done = c.execute(sa.select(t.approvals).where(
                (t.approvals.c.intent == intent) & (t.approvals.c.environment == env)
                & (t.approvals.c.artifact == artifact))).first()
            if done:
                return False
            c.execute(t.approvals.insert().values(
                intent=intent, environment=env, artifact=artifact, approved_by=by, at=now()))
            return True

    def approvals(self) -> set[tuple[str, str, str]]:
        with self.engine.connect() as c:
            return {(r.intent, r.environment, r.artifact) for r in c.execute(sa.select(t.approvals))}

    # -- disaster recovery -----------------------------------------------------------------------
    def last_successful_drill_at(self) -> datetime | None:
        with self.engine.connect() as c:
            return as_utc(c.execute(sa.select(sa.func.max(t.dr_drills.c.finished_at))
                                    .where(t.dr_drills.c.ok.is_(True))).scalar())

    # -- LLM ledger and response cache -------------------------------------------------------------
    def record_llm_call(self, **row: Any) -> None:
        with self.tx() as c:
            c.execute(t.llm_ledger.insert().values(at=now(), **row))

    def llm_spend(self, *, intent: str | None = None, since: datetime | None = None,
                  run_id: str | None = None) -> float:
        q = sa.select(sa.func.coalesce(sa.func.sum(t.llm_ledger.c.cost_usd), 0))
        if intent is not None:
            q = q.where(t.llm_ledger.c.intent == intent)
        if since is not None:
            q = q.where(t.llm_ledger.c.at >= since)
        if run_id is not None:
            q = q.where(t.llm_ledger.c.run_id == run_id)
        with self.engine.connect() as c:
            return float(c.execute(q).scalar() or 0)

    def llm_calls(self, **filters: Any) -> list[sa.Row]:
        q = sa.select(t.llm_ledger).order_by(t.llm_ledger.c.id)
        for key, value in filters.items():
            q = q.where(t.llm_ledger.c[key] == value)
        with self.engine.connect() as c:
            return list(c.execute(q))

    def cache_get(self, key: str) -> Any | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(t.llm_cache.c.response).where(t.llm_cache.c.key == key)).scalar()

    def cache_put(self, key: str, *, task: str, provider: str, model: str, response: Any) -> None:
        with self.tx() as c:
            if c.execute(sa.select(t.llm_cache.c.key).where(t.llm_cache.c.key == key)).first() is None:
                c.execute(t.llm_cache.insert().values(
                    key=key, task=task, provider=provider, model=model, response=response, created_at=now()))

    # -- intent embeddings (similar past intents) -----------------------------------------------
    def intent_embedding(self, intent: str, content_hash: str, model: str) -> dict[str, Any] | None:
        """The stored vector of one intent text, with the neighbours chosen for it; None if never embedded."""
        e = t.intent_embeddings.c
        with self.engine.connect() as c:
            row = c.execute(sa.select(e.vector, e.neighbours).where(
                (e.intent == intent) & (e.content_hash == content_hash) & (e.model == model))).first()
        return None if row is None else {"vector": _unpack(row.vector), "neighbours": row.neighbours}

    def intent_embeddings(self, model: str, *, exclude: str | None = None) -> dict[str, tuple[list[float], str]]:
        """The newest vector and summary of every embedded intent (but `exclude`), by intent name."""
        e = t.intent_embeddings.c
        q = sa.select(e.intent, e.vector, e.summary).where(e.model == model)
        if exclude is not None:
            q = q.where(e.intent != exclude)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(e.created_at, e.intent))
            return {r.intent: (_unpack(r.vector), r.summary) for r in rows}  # later rows replace older ones

    def save_intent_embedding(self, intent: str, content_hash: str, model: str, vector: list[float], *,
                              summary: str, neighbours: list[dict[str, Any]] | None) -> None:
        """Store (or replace) the vector of one intent text; it becomes that intent's newest."""
        e = t.intent_embeddings
        key = (e.c.intent == intent) & (e.c.content_hash == content_hash) & (e.c.model == model)
        with self.tx() as c:
            c.execute(e.delete().where(key))
            c.execute(e.insert().values(intent=intent, content_hash=content_hash, model=model, dim=len(vector),
                                        vector=_pack(vector), summary=summary, neighbours=neighbours,
                                        created_at=now()))

    # -- business-model graph (the SQL graph store) --------------------------------------------
    def replace_graph(self, intent: str, nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> None:
        with self.tx() as c:
            c.execute(t.graph_edges.delete().where(t.graph_edges.c.intent == intent))
            c.execute(t.graph_nodes.delete().where(t.graph_nodes.c.intent == intent))
            if nodes:
                c.execute(t.graph_nodes.insert(), [{"intent": intent, **n} for n in nodes])
            if edges:
                c.execute(t.graph_edges.insert(), [{"intent": intent, **e} for e in edges])

    def graph(self, intent: str) -> tuple[list[sa.Row], list[sa.Row]]:
        with self.engine.connect() as c:
            nodes = list(c.execute(sa.select(t.graph_nodes).where(t.graph_nodes.c.intent == intent)
                                   .order_by(t.graph_nodes.c.key)))
            edges = list(c.execute(sa.select(t.graph_edges).where(t.graph_edges.c.intent == intent)
                                   .order_by(t.graph_edges.c.src, t.graph_edges.c.dst)))
        return nodes, edges

    def graph_usage(self, entity: str) -> tuple[list[sa.Row], list[sa.Row]]:
        """Entity nodes of that name and the REFERENCES edges to it, across all intents."""
        n, e = t.graph_nodes.c, t.graph_edges.c
        with self.engine.connect() as c:
            nodes = list(c.execute(sa.select(n.intent, n.key).where(n.key == entity, n.kind == "Entity")))
            edges = list(c.execute(sa.select(e.intent, e.src, e.properties)
                                   .where(e.dst == entity, e.kind == "REFERENCES")))
        return nodes, edges


def _pack(vector: list[float]) -> bytes:
    """float32 little-endian: the same bytes on every platform and in both databases."""
    import struct

    return struct.pack(f"<{len(vector)}f", *vector)


def _unpack(data: bytes) -> list[float]:
    import struct

    if len(data) % 4:
        return []  # not float32s: reported as a vector of the wrong dimension, never compared
    return list(struct.unpack(f"<{len(data) // 4}f", data))
