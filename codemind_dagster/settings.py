"""One typed settings object, read from the environment."""

from __future__ import annotations

import os
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

# Where environments' stable URLs live: below the kernel's ephemeral range (32768-60999 by default), so no
# outgoing connection can be handed an environment's port while its proxy restarts.
PUBLIC_PORTS = (20000, 29999)


def check_port_range(lo: int, hi: int) -> tuple[int, int]:
    """(lo, hi) when it is an inclusive range within 1024-65535, low end first; else ValueError."""
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"public ports {lo}-{hi}: expected a range within 1024-65535, low end first")
    return lo, hi


@lru_cache(maxsize=4)
def _database_url_from_secret(secret_id: str, region: str) -> str:
    from codemind_dagster.resources.secrets import database_url_from_secret

    return database_url_from_secret(secret_id, region_name=region).get_secret_value()


class Settings(BaseModel):
    """Everything configurable; `Settings.from_env()` is the only reader of CODEMIND_* variables."""

    profile: Literal["local", "k8s"] = "local"
    home: Path = Path(".codemind")
    database_url: str | None = None
    daily_llm_budget_usd: float = Field(default=50.0, ge=0)
    run_llm_budget_usd: float = Field(default=10.0, ge=0)
    sandbox_timeout_s: float = Field(default=180.0, gt=0)
    sandbox_memory_mb: int = Field(default=2048, ge=128)
    health_timeout_s: float = Field(default=30.0, gt=0)
    coverage_threshold: float = Field(default=80.0, ge=0, le=100)
    backup_retention: int = Field(default=8, ge=1)
    # Production promotion waits while the last successful DR drill is older than this; None: no gate.
    dr_max_validation_age_s: float | None = Field(default=None, gt=0)
    # The staging load test: how long it drives the mixed workload and with how many concurrent clients.
    loadtest_duration_s: float = Field(default=3.0, gt=0, le=3600)
    loadtest_concurrency: int = Field(default=4, ge=1, le=256)
    # Production's canary: the new version's share of traffic at each step, each watched for canary_pause_s.
    canary_steps: str = "10,50,100"
    canary_pause_s: float = Field(default=2.0, ge=0, le=3600)
    prometheus_url: str | None = None  # the canary analysis reads PromQL here instead of the proxy's counters
    dr_keep_releases: bool = False  # k8s: leave the releases a drill redeployed into the dr cluster running
    redis_url: str | None = None
    llm_routing: Literal["offline", "providers"] = "offline"
    llm_routes: str | None = None  # JSON routing table overriding the mode's defaults
    repair_rounds: int = Field(default=3, ge=0, le=10)
    public_ports: tuple[int, int] = PUBLIC_PORTS
    # k8s profile: one kubeconfig (default $CODEMIND_HOME/kube/config, as `make k8s-up` writes it) and
    # JSON maps of environment -> context / namespace over the defaults in resources/clusters.py.
    kubeconfig: Path | None = None
    k8s_contexts: str | None = None
    k8s_namespaces: str | None = None
    # Production stores, each used when configured (any profile); the embedded ones stay the default.
    s3_bucket: str | None = None  # artifacts in S3 instead of $CODEMIND_HOME/artifacts
    s3_endpoint_url: str | None = None  # moto or another S3-compatible endpoint; None: AWS
    aws_region: str = "us-east-1"
    aws_secret_id: str | None = None  # a Secrets Manager secret (JSON) holding provider keys and the DB URL
    aws_cost: bool = False  # add AWS Cost Explorer spend to cost_report
    aws_budgets: str | None = None  # JSON environment -> daily AWS budget in USD
    neo4j_url: str | None = None  # the business-model graph in Neo4j (bolt://...) instead of SQL tables
    neo4j_user: str = "neo4j"  # its password comes from CODEMIND_NEO4J_PASSWORD, read by dg.EnvVar

    @field_validator("public_ports", mode="before")
    @classmethod
    def _port_range(cls, v: object) -> object:
        """`20000-29999` (inclusive), as CODEMIND_PUBLIC_PORTS gives it."""
        if isinstance(v, str):
            lo, sep, hi = v.partition("-")
            if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
                raise ValueError(f"expected LOW-HIGH, e.g. 20000-29999, got {v!r}")
            return int(lo), int(hi)
        return v

    @field_validator("canary_steps")
    @classmethod
    def _canary_steps(cls, v: str) -> str:
        from codemind_dagster.domain.canary import parse_steps

        parse_steps(v, 0.0)  # ValueError names what is wrong
        return v

    @field_validator("public_ports")
    @classmethod
    def _ports_in_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        return check_port_range(*v)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        raw = {
            "profile": e.get("CODEMIND_PROFILE"),
            "home": e.get("CODEMIND_HOME"),
            "database_url": e.get("CODEMIND_DATABASE_URL"),
            "daily_llm_budget_usd": e.get("CODEMIND_DAILY_LLM_BUDGET_USD"),
            "run_llm_budget_usd": e.get("CODEMIND_RUN_LLM_BUDGET_USD"),
            "sandbox_timeout_s": e.get("CODEMIND_SANDBOX_TIMEOUT_S"),
            "sandbox_memory_mb": e.get("CODEMIND_SANDBOX_MEMORY_MB"),
            "health_timeout_s": e.get("CODEMIND_HEALTH_TIMEOUT_S"),
            "coverage_threshold": e.get("CODEMIND_COVERAGE_THRESHOLD"),
            "backup_retention": e.get("CODEMIND_BACKUP_RETENTION"),
            "dr_max_validation_age_s": e.get("CODEMIND_DR_MAX_VALIDATION_AGE_S"),
            "dr_keep_releases": e.get("CODEMIND_DR_KEEP_RELEASES"),
            "loadtest_duration_s": e.get("CODEMIND_LOADTEST_DURATION_S"),
            "loadtest_concurrency": e.get("CODEMIND_LOADTEST_CONCURRENCY"),
            "canary_steps": e.get("CODEMIND_CANARY_STEPS"),
            "canary_pause_s": e.get("CODEMIND_CANARY_PAUSE_S"),
            "prometheus_url": e.get("CODEMIND_PROMETHEUS_URL"),
            "redis_url": e.get("CODEMIND_REDIS_URL"),
            "llm_routing": e.get("CODEMIND_LLM_ROUTING"),
            "llm_routes": e.get("CODEMIND_LLM_ROUTES"),
            "repair_rounds": e.get("CODEMIND_REPAIR_ROUNDS"),
            "public_ports": e.get("CODEMIND_PUBLIC_PORTS"),
            "kubeconfig": e.get("CODEMIND_KUBECONFIG"),
            "k8s_contexts": e.get("CODEMIND_K8S_CONTEXTS"),
            "k8s_namespaces": e.get("CODEMIND_K8S_NAMESPACES"),
            "s3_bucket": e.get("CODEMIND_S3_BUCKET"),
            "s3_endpoint_url": e.get("CODEMIND_S3_ENDPOINT_URL"),
            "aws_region": e.get("CODEMIND_AWS_REGION"),
            "aws_secret_id": e.get("CODEMIND_AWS_SECRET_ID"),
            "aws_cost": e.get("CODEMIND_AWS_COST"),
            "aws_budgets": e.get("CODEMIND_AWS_BUDGETS"),
            "neo4j_url": e.get("CODEMIND_NEO4J_URL"),
            "neo4j_user": e.get("CODEMIND_NEO4J_USER"),
        }
        s = cls.model_validate({k: v for k, v in raw.items() if v not in (None, "")})
        update: dict[str, object] = {"home": s.home.expanduser().resolve()}
        if s.profile == "k8s" and s.aws_secret_id and not s.database_url:
            # The k8s profile's DB URL may live in Secrets Manager beside the provider keys.
            update["database_url"] = _database_url_from_secret(s.aws_secret_id, s.aws_region)
        return s.model_copy(update=update)

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'platform.db'}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.kubeconfig or self.home / "kube" / "config"

    @property
    def intents_dir(self) -> Path:
        return self.home / "intents"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def runtime_dir(self) -> Path:
        return self.home / "runtime"

    @property
    def sandbox_dir(self) -> Path:
        return self.home / "sandbox"

    @property
    def backups_dir(self) -> Path:
        return self.home / "backups"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"
