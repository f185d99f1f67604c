"""Dagster resources: thin, configurable handles on the platform's clients."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import PrivateAttr, SecretStr

from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.settings import PUBLIC_PORTS, Settings

if TYPE_CHECKING:
    from codemind_dagster.domain.intent import Intent
    from codemind_dagster.domain.loadtest import LoadTestResult
    from codemind_dagster.resources.artifacts import LocalArtifactStore
    from codemind_dagster.resources.canary import CanaryRollout
    from codemind_dagster.resources.graph import SqlGraphStore
    from codemind_dagster.resources.intent_store import IntentStore
    from codemind_dagster.resources.llm.router import ModelRouter
    from codemind_dagster.resources.runtime import LocalRuntime
    from codemind_dagster.resources.sandbox import SubprocessSandbox

_MIGRATED: set[str] = set()


class DatabaseResource(dg.ConfigurableResource):
    """The platform database: SQLite under CODEMIND_HOME by default, PostgreSQL by URL."""

    url: str

    def client(self) -> PlatformDB:
        db = PlatformDB(self.url)
        if self.url not in _MIGRATED:
            db.migrate()
            _MIGRATED.add(self.url)
        return db


class PromotionPolicyResource(dg.ConfigurableResource):
    """Conditions of promotion beyond checks and approvals: DR readiness and the staging load test's SLO."""

    dr_max_validation_age_s: float | None = None
    loadtest_duration_s: float = 3.0
    loadtest_concurrency: int = 4
    canary_steps: str = "10,50,100"
    canary_pause_s: float = 2.0
    prometheus_url: str | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> PromotionPolicyResource:
        return cls(dr_max_validation_age_s=s.dr_max_validation_age_s, loadtest_duration_s=s.loadtest_duration_s,
                   loadtest_concurrency=s.loadtest_concurrency, canary_steps=s.canary_steps,
                   canary_pause_s=s.canary_pause_s, prometheus_url=s.prometheus_url)

    def rollout(self, intent: Intent, environment: str) -> CanaryRollout:
        """The canary production gets: the configured steps, read-only traffic on the intent's collections."""
        from codemind_dagster.domain.canary import AnalysisPolicy, parse_steps
        from codemind_dagster.resources.canary import CanaryRollout, ProxyWindow
        from codemind_dagster.resources.loadtest import Workload

        paths = tuple(sorted({load.path for load in Workload(intent).entities.values()
                              if "list" in load.spec.operations})) or ("/",)
        window = ProxyWindow
        if self.prometheus_url:
            from codemind_dagster.resources.canary_prometheus import PrometheusWindow

            url = self.prometheus_url

            def window(metrics_url: str):
                # Pinned to the proxy now running: a restarted proxy must be scraped before a step counts.
                return PrometheusWindow(url, intent.name, environment, metrics_url=metrics_url)

        slo = intent.spec.slo
        return CanaryRollout(steps=parse_steps(self.canary_steps, self.canary_pause_s), policy=AnalysisPolicy(),
                             paths=paths, p95_latency_ms=slo.p95_latency_ms if slo else None,
                             availability=slo.availability if slo else None, window=window,
                             concurrency=self.loadtest_concurrency)

    def load_test(self, url: str, intent: Intent) -> LoadTestResult:
        """Drive the intent's mixed workload at `url` for the configured duration and concurrency."""
        from codemind_dagster.resources.loadtest import run_load_test

        return run_load_test(url, intent, duration_s=self.loadtest_duration_s,
                             concurrency=self.loadtest_concurrency)

    def dr_hold(self, db: PlatformDB) -> str | None:
        """Why production must wait for a DR drill, or None."""
        from datetime import timedelta

        from codemind_dagster.resources.database import now

        if self.dr_max_validation_age_s is None:
            return None
        last = db.last_successful_drill_at()
        limit = timedelta(seconds=self.dr_max_validation_age_s)
        if last is None:
            return f"production waits for a successful DR drill (none yet; max age {limit})"
        age = now() - last
        if age > limit:
            return f"production waits for a DR drill: the last successful one is {age} old (max {limit})"
        return None


class IntentStoreResource(dg.ConfigurableResource):
    """Validated intents: the watched directory plus the intents table."""

    database: DatabaseResource
    directory: str

    def store(self) -> IntentStore:
        from codemind_dagster.resources.intent_store import IntentStore

        return IntentStore(self.database.client(), Path(self.directory))


class ArtifactStoreResource(dg.ConfigurableResource):
    """Content-addressed code bundles and test reports."""

    root: str

    def store(self) -> LocalArtifactStore:
        from codemind_dagster.resources.artifacts import LocalArtifactStore

        return LocalArtifactStore(Path(self.root))


class GraphStoreResource(dg.ConfigurableResource):
    """The business-model graph: SQL tables of the platform database."""

    database: DatabaseResource

    def store(self) -> SqlGraphStore:
        from codemind_dagster.resources.graph import SqlGraphStore

        return SqlGraphStore(self.database.client())


class ModelRouterResource(dg.ConfigurableResource):
    """The only door from agents to models: routing, retries, cache, budgets and ledger."""

    database: DatabaseResource
    daily_budget_usd: float
    run_budget_usd: float
    routing: str = "offline"
    routes_json: str | None = None
    redis_url: str | None = None
    # A Secrets Manager secret (JSON) holding the provider keys; None: keys come from env vars.
    secret_id: str | None = None
    secret_region: str | None = None
    secret_endpoint_url: str | None = None
    _secret: dict[str, SecretStr] | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Resolved at resource init (once per run in process, once per step's pod): a bad secret fails there.
        self.provider_secret()

    def provider_secret(self) -> dict[str, SecretStr] | None:
        """The configured secret's values (fetched once per resource instance), or None without a secret id."""
        if self.secret_id and self._secret is None:
            from codemind_dagster.resources.secrets import fetch_secret

            self._secret = fetch_secret(self.secret_id, region_name=self.secret_region,
                                        endpoint_url=self.secret_endpoint_url)
        return self._secret

    def router(self) -> ModelRouter:
        from codemind_dagster.resources.llm.router import ModelRouter

        routes, cache, providers = None, None, None
        if self.routes_json:
            from codemind_dagster.resources.llm.routes_config import parse_routes

            routes = parse_routes(self.routes_json)
        if self.redis_url:
            from codemind_dagster.resources.llm.cache import RedisResponseCache

            cache = RedisResponseCache(self.redis_url)
        secret = self.provider_secret()
        if secret is not None:
            from codemind_dagster.resources.llm.config import ProviderConfig, build_providers

            providers = build_providers(ProviderConfig.from_env(secret=secret))
        return ModelRouter(db=self.database.client(), routing=self.routing, routes=routes, cache=cache,
                           providers=providers, daily_budget_usd=self.daily_budget_usd,
                           run_budget_usd=self.run_budget_usd)


class TestSandboxResource(dg.ConfigurableResource):
    """Where generated tests run: a subprocess with a time limit, a memory cap and a scrubbed env."""

    __test__ = False  # not a pytest class

    root: str
    timeout_s: float
    memory_mb: int
    coverage_threshold: float
    repair_rounds: int = 3

    def sandbox(self) -> SubprocessSandbox:
        from codemind_dagster.resources.sandbox import SubprocessSandbox

        return SubprocessSandbox(Path(self.root), timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def test(self, context, *, bundle: dict[str, str], suite, artifact: str, workdir: Path):
        """Run the testing agent on one artifact in `workdir`; returns its TestReport."""
        from codemind_dagster.agents.testing import run_tests

        return run_tests(bundle=bundle, suite=suite, artifact=artifact, workdir=workdir, sandbox=self.sandbox())


class RuntimeResource(dg.ConfigurableResource):
    """The deploy target: local processes behind a stable port per environment, blue/green."""

    root: str
    health_timeout_s: float
    # Inclusive range of the environments' stable ports: see settings.PUBLIC_PORTS.
    public_port_low: int = PUBLIC_PORTS[0]
    public_port_high: int = PUBLIC_PORTS[1]

    def runtime(self) -> LocalRuntime:
        from codemind_dagster.resources.runtime import LocalRuntime

        return LocalRuntime(Path(self.root), health_timeout_s=self.health_timeout_s,
                            public_ports=(self.public_port_low, self.public_port_high))


class ReportsResource(dg.ConfigurableResource):
    """Where cost reports are written ($CODEMIND_HOME/reports) and the billing account named in FOCUS exports."""

    root: str
    billing_account_id: str = "codemind"
    billing_account_name: str = "CodeMind"

    def focus_path(self, day: date) -> Path:
        return Path(self.root) / "focus" / f"{day.isoformat()}.csv"

    def budget_path(self, day: date) -> Path:
        return Path(self.root) / "budget" / f"{day.isoformat()}.csv"
