"""Tables of the platform database; Alembic migrations are written against this metadata."""

import sqlalchemy as sa

metadata = sa.MetaData()
TS = sa.DateTime(timezone=True)

intents = sa.Table(
    "intents", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("source", sa.String(1024), nullable=False),
    sa.Column("submitted_at", TS, nullable=False),
    sa.Column("requested_hash", sa.String(64)),
    sa.Column("requested_at", TS),
    sa.Column("error", sa.Text),
    sa.Column("error_at", TS),
)

rejected_intents = sa.Table(
    "rejected_intents", metadata,
    sa.Column("file", sa.String(1024), primary_key=True),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("file_hash", sa.String(64), nullable=False),
    sa.Column("at", TS, nullable=False),
)

graph_nodes = sa.Table(
    "graph_nodes", metadata,
    sa.Column("intent", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("properties", sa.JSON, nullable=False),
)

graph_edges = sa.Table(
    "graph_edges", metadata,
    sa.Column("intent", sa.String(64), primary_key=True),
    sa.Column("src", sa.String(128), primary_key=True),
    sa.Column("dst", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("properties", sa.JSON, nullable=False),
)

llm_ledger = sa.Table(
    "llm_ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TS, nullable=False, index=True),
    sa.Column("run_id", sa.String(64)),
    sa.Column("intent", sa.String(64)),  # looked up through ix_llm_ledger_report, which leads with it
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_write_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_read_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("output_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cost_usd", sa.Numeric(18, 8), nullable=False, default=0),
    # What prompt caching saved against paying the full input price for the cached tokens.
    sa.Column("cache_savings_usd", sa.Numeric(18, 8), nullable=False, server_default="0"),
    sa.Column("price_version", sa.String(32), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False, default=0),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False, default=False),
    sa.Column("error", sa.Text),
    # Covers the daily cost report in group-key order, so SQLite aggregates without sorting the day.
    sa.Index("ix_llm_ledger_report", "intent", "task", "provider", "model", "price_version", "at", "cache_hit",
             "outcome", "input_tokens", "cache_write_tokens", "cache_read_tokens", "output_tokens",
             "reasoning_tokens", "cost_usd"),
)

llm_cache = sa.Table(
    "llm_cache", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("response", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

test_runs = sa.Table(
    "test_runs", metadata,
    sa.Column("intent", sa.String(64), primary_key=True),
    sa.Column("artifact", sa.String(64), primary_key=True),
    sa.Column("report", sa.JSON, nullable=False),
    sa.Column("at", TS, nullable=False),
)

releases = sa.Table(
    "releases", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("intent", sa.String(64), nullable=False, index=True),
    sa.Column("artifact", sa.String(64), nullable=False),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("created_at", TS, nullable=False),
)

deployments = sa.Table(
    "deployments", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("intent", sa.String(64), nullable=False, index=True),
    sa.Column("environment", sa.String(16), nullable=False),
    sa.Column("artifact", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("url", sa.String(256)),
    sa.Column("pid", sa.Integer),
    sa.Column("run_id", sa.String(64)),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS),
    sa.Column("detail", sa.Text),
)

promotions = sa.Table(
    "promotions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("intent", sa.String(64), nullable=False),
    sa.Column("environment", sa.String(16), nullable=False),
    sa.Column("artifact", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("run_id", sa.String(64)),
    sa.Column("requested_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("detail", sa.Text),
    sa.UniqueConstraint("intent", "environment", "artifact", name="uq_promotion_target"),
)

approvals = sa.Table(
    "approvals", metadata,
    sa.Column("intent", sa.String(64), primary_key=True),
    sa.Column("environment", sa.String(16), primary_key=True),
    sa.Column("artifact", sa.String(64), primary_key=True),
    sa.Column("approved_by", sa.String(128), nullable=False),
    sa.Column("at", TS, nullable=False),
)

backups = sa.Table(
    "backups", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("data_as_of", TS, nullable=False),
    sa.Column("location", sa.String(1024), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text),
)

dr_drills = sa.Table(
    "dr_drills", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("backup_id", sa.String(64), nullable=False, index=True),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("rpo_s", sa.Float, nullable=False),
    sa.Column("rto_s", sa.Float, nullable=False),
    sa.Column("checks", sa.JSON, nullable=False),
    sa.Column("detail", sa.Text),
)

budget_alerts = sa.Table(
    "budget_alerts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(128), nullable=False),
    sa.Column("threshold_percent", sa.Integer, nullable=False),
    sa.Column("spend_usd", sa.Numeric(18, 8), nullable=False),
    sa.Column("budget_usd", sa.Numeric(18, 8), nullable=False),
    sa.Column("at", TS, nullable=False),
    sa.UniqueConstraint("scope", "threshold_percent", name="uq_budget_alert"),
)

intent_embeddings = sa.Table(
    "intent_embeddings", metadata,
    sa.Column("intent", sa.String(64), primary_key=True),
    sa.Column("content_hash", sa.String(64), primary_key=True),  # of the embedded text: a re-run reuses the row
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("dim", sa.Integer, nullable=False),
    # float32 little-endian: BLOB in SQLite, bytea in PostgreSQL, 1.5 KiB a row at 384 dimensions.
    sa.Column("vector", sa.LargeBinary, nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    # The neighbours chosen when this row was made: reused so an unchanged intent's prompts stay identical.
    sa.Column("neighbours", sa.JSON),
    sa.Column("created_at", TS, nullable=False),
)
