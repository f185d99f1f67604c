"""The environment resolver: one resource set per profile, one asset graph for both."""

from __future__ import annotations

from typing import Any

import dagster as dg

from codemind_dagster.resources.backups import BackupStoreResource
from codemind_dagster.resources.platform import (
    ArtifactStoreResource,
    DatabaseResource,
    GraphStoreResource,
    IntentStoreResource,
    ModelRouterResource,
    PromotionPolicyResource,
    ReportsResource,
    RuntimeResource,
    TestSandboxResource,
)
from codemind_dagster.resources.probes import ProbeResource
from codemind_dagster.settings import Settings

K8S_PENDING = (
    "the k8s profile is not available yet: its Kubernetes runtime, pod sandbox, S3 artifacts and real LLM "
    "providers are still to be built; use CODEMIND_PROFILE=local (the default)"
)


def local_resources(s: Settings) -> dict[str, Any]:
    db = DatabaseResource(url=s.db_url)
    return {
        "database": db,
        "intent_store": IntentStoreResource(database=db, directory=str(s.intents_dir)),
        "artifacts": ArtifactStoreResource(root=str(s.artifacts_dir)),
        "graph_store": GraphStoreResource(database=db),
        "llm": ModelRouterResource(database=db, daily_budget_usd=s.daily_llm_budget_usd,
                                   run_budget_usd=s.run_llm_budget_usd, routing=s.llm_routing,
                                   routes_json=s.llm_routes,
                                   redis_url=dg.EnvVar("CODEMIND_REDIS_URL") if s.redis_url else None),
        "sandbox": TestSandboxResource(root=str(s.sandbox_dir), timeout_s=s.sandbox_timeout_s,
                                       memory_mb=s.sandbox_memory_mb, coverage_threshold=s.coverage_threshold,
                                       repair_rounds=s.repair_rounds),
        "runtime": RuntimeResource(root=str(s.runtime_dir), health_timeout_s=s.health_timeout_s,
                                   public_port_low=s.public_ports[0], public_port_high=s.public_ports[1]),
        "promotion_policy": PromotionPolicyResource(dr_max_validation_age_s=s.dr_max_validation_age_s),
        # Through EnvVar, so a password in the URL never shows in the UI's resource config.
        "reports": ReportsResource(root=str(s.reports_dir)),
        "backups": BackupStoreResource(database=db, root=str(s.backups_dir), artifacts_root=str(s.artifacts_dir),
                                       retention=s.backup_retention),
        "probes": ProbeResource(redis_url=dg.EnvVar("CODEMIND_REDIS_URL") if s.redis_url else None),
    }


def resources_for(s: Settings) -> dict[str, Any]:
    if s.profile == "local":
        return local_resources(s)
    raise RuntimeError(K8S_PENDING)
