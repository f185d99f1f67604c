"""Health and latency of the services the platform depends on: platform DB, graph store, Redis, stores."""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import sqlalchemy as sa

from codemind_dagster.resources import tables as t
from codemind_dagster.resources.backends import Backends, display_url
from codemind_dagster.resources.database import PlatformDB

DEFAULT_TIMEOUT_S = 1.0
NEO4J_PASSWORD_ENV = "CODEMIND_NEO4J_PASSWORD"
# Every Cost Explorer request is billed (USD 0.01 on AWS), so a health probe never calls it.
COST_EXPLORER_NOT_PROBED = "enabled; not probed (each Cost Explorer request is billed)"


def _result(name: str, healthy: bool, started: float, detail: str) -> dict[str, Any]:
    return {"name": name, "healthy": healthy, "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "detail": detail}


def _error(exc: BaseException) -> str:
    # First line only: driver errors append SQL and background links that bury the cause.
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def probe_database(db: PlatformDB) -> dict[str, Any]:
    """`SELECT 1` through the platform engine."""
    started = time.perf_counter()
    try:
        with db.engine.connect() as c:
            c.execute(sa.text("SELECT 1")).scalar()
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        return _result("platform_db", False, started, _error(exc))
    return _result("platform_db", True, started, f"{db.engine.dialect.name}: SELECT 1 ok")


def probe_graph_store(db: PlatformDB) -> dict[str, Any]:
    """The SQL graph store lives in the platform DB: a query on its node table proves it is usable."""
    started = time.perf_counter()
    try:
        with db.engine.connect() as c:
            nodes = c.execute(sa.select(sa.func.count()).select_from(t.graph_nodes)).scalar()
    except Exception as exc:  # noqa: BLE001
        return _result("graph_store", False, started, _error(exc))
    return _result("graph_store", True, started, f"sql graph store: {nodes} node(s)")


def redis_display(url: str) -> str:
    """The URL without credentials, safe for metadata and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "<unparseable redis url>"


def probe_redis(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """PING with short timeouts and no retries, so an unreachable Redis costs at most ~timeout_s."""
    started = time.perf_counter()
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0))
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return _result("redis", False, started, f"{redis_display(url)}: {_error(exc)}")
    return _result("redis", True, started, f"{redis_display(url)}: PONG")


def _aws_client(service: str, b: Backends, timeout_s: float, endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1})
    return boto3.client(service, region_name=b.aws_region, endpoint_url=endpoint_url, config=config)


def probe_s3(b: Backends, timeout_s: float) -> dict[str, Any]:
    """HEAD of the artifact bucket."""
    started = time.perf_counter()
    try:
        _aws_client("s3", b, timeout_s, b.s3_endpoint_url).head_bucket(Bucket=b.s3_bucket)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        return _result("artifacts", False, started, f"s3://{b.s3_bucket}: {_error(exc)}")
    return _result("artifacts", True, started, f"s3://{b.s3_bucket}: bucket answers")


def probe_secret(b: Backends, timeout_s: float) -> dict[str, Any]:
    """DescribeSecret: proves the secret exists and is readable by name without fetching its value."""
    started = time.perf_counter()
    try:
        meta = _aws_client("secretsmanager", b, timeout_s).describe_secret(SecretId=b.aws_secret_id)
    except Exception as exc:  # noqa: BLE001
        return _result("secrets", False, started, f"secret {b.aws_secret_id}: {_error(exc)}")
    changed = meta.get("LastChangedDate")
    return _result("secrets", True, started, f"secret {b.aws_secret_id}: exists"
                   + (f", changed {changed:%Y-%m-%d}" if changed else ""))


def probe_neo4j(b: Backends, timeout_s: float, password: str | None) -> dict[str, Any]:
    """`RETURN 1` over Bolt, with the connection timeout bounding an unreachable server."""
    from codemind_dagster.resources.graph_neo4j import Neo4jGraphStore

    started = time.perf_counter()
    with Neo4jGraphStore(b.neo4j_url, b.neo4j_user, password, timeout_s=timeout_s) as store:
        why = store.ping()
    return _result("graph_store", why is None, started, why or f"neo4j {display_url(b.neo4j_url)}: RETURN 1 ok")


def probe_backends(b: Backends, timeout_s: float, neo4j_password: str | None = None) -> list[dict[str, Any]]:
    """Probes of the configured production stores."""
    probes = [probe_neo4j(b, timeout_s, neo4j_password)] if b.neo4j_url else []
    if b.s3_bucket:
        probes.append(probe_s3(b, timeout_s))
    if b.aws_secret_id:
        probes.append(probe_secret(b, timeout_s))
    if b.aws_cost:
        probes.append({"name": "cloud_cost", "healthy": True, "probed": False, "latency_ms": 0.0,
                       "detail": f"aws cost explorer ({b.aws_region}): {COST_EXPLORER_NOT_PROBED}"})
    return probes


def probe_supporting(db: PlatformDB, redis_url: str | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     backends: Backends | None = None, neo4j_password: str | None = None) -> list[dict[str, Any]]:
    stores = probe_backends(backends, timeout_s, neo4j_password) if backends else []
    graph = [] if any(p["name"] == "graph_store" for p in stores) else [probe_graph_store(db)]
    probes = [probe_database(db), *graph]
    if redis_url:
        probes.append(probe_redis(redis_url, timeout_s))
    return probes + stores


class ProbeResource(dg.ConfigurableResource):
    """Which optional supporting services to probe: Redis and each production store only when configured."""

    redis_url: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_secret_id: str | None = None
    aws_cost: bool = False
    neo4j_url: str | None = None
    neo4j_user: str = "neo4j"
    neo4j_password: str | None = None

    def backends(self) -> Backends:
        return Backends(**{k: getattr(self, k) for k in Backends.model_fields})

    @classmethod
    def from_settings(cls, s) -> ProbeResource:
        """Probes of what Settings configure; secrets stay EnvVar references."""
        return cls(redis_url=dg.EnvVar("CODEMIND_REDIS_URL") if s.redis_url else None,
                   neo4j_password=neo4j_password_env(), **Backends.from_settings(s).model_dump())


def neo4j_password_env() -> dg.EnvVar | None:
    """The Neo4j password as an EnvVar reference, so it never lands in run config; None when unset."""
    return dg.EnvVar(NEO4J_PASSWORD_ENV) if os.environ.get(NEO4J_PASSWORD_ENV) else None
