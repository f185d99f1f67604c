"""The environment resolver: one resource set per profile, one asset graph for both."""

from __future__ import annotations

from typing import Any

import dagster as dg

from codemind_dagster.resources.aws_cost import AwsCostResource
from codemind_dagster.resources.backups import BackupStoreResource
from codemind_dagster.resources.embeddings import SimilarIntentsResource
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

K8S_NEEDS_POSTGRES = (
    "the k8s profile keeps the platform database (and the Dagster instance) on PostgreSQL: set "
    "CODEMIND_DATABASE_URL, e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def local_resources(s: Settings) -> dict[str, Any]:
    db = DatabaseResource(url=s.db_url)
    res = {
        "database": db,
        "intent_store": IntentStoreResource(database=db, directory=str(s.intents_dir)),
        "artifacts": ArtifactStoreResource(root=str(s.artifacts_dir)),
        "graph_store": GraphStoreResource(database=db),
        "similar_intents": SimilarIntentsResource(database=db),
        "llm": ModelRouterResource(database=db, daily_budget_usd=s.daily_llm_budget_usd,
                                   run_budget_usd=s.run_llm_budget_usd, routing=s.llm_routing,
                                   routes_json=s.llm_routes, secret_id=s.aws_secret_id,
                                   secret_region=s.aws_region if s.aws_secret_id else None,
                                   redis_url=dg.EnvVar("CODEMIND_REDIS_URL") if s.redis_url else None),
        "sandbox": TestSandboxResource(root=str(s.sandbox_dir), timeout_s=s.sandbox_timeout_s,
                                       memory_mb=s.sandbox_memory_mb, coverage_threshold=s.coverage_threshold,
                                       repair_rounds=s.repair_rounds),
        "runtime": RuntimeResource(root=str(s.runtime_dir), health_timeout_s=s.health_timeout_s,
                                   public_port_low=s.public_ports[0], public_port_high=s.public_ports[1]),
        "promotion_policy": PromotionPolicyResource.from_settings(s),
        "reports": ReportsResource(root=str(s.reports_dir)),
        "backups": BackupStoreResource(database=db, root=str(s.backups_dir), artifacts_root=str(s.artifacts_dir),
                                       retention=s.backup_retention),
        "probes": ProbeResource.from_settings(s),
        "aws_cost": AwsCostResource(enabled=s.aws_cost, region_name=s.aws_region, budgets_json=s.aws_budgets),
    }
    return {**res, **store_resources(s)}


def store_resources(s: Settings) -> dict[str, Any]:
    """The production stores Settings configure, over the embedded ones (any profile)."""
    res: dict[str, Any] = {}
    if s.s3_bucket:
        from codemind_dagster.resources.artifacts_s3 import S3ArtifactStoreResource

        res["artifacts"] = S3ArtifactStoreResource(bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url,
                                                   region_name=s.aws_region, cache_root=str(s.artifacts_dir))
    if s.neo4j_url:
        from codemind_dagster.resources.graph_neo4j import Neo4jGraphStoreResource
        from codemind_dagster.resources.probes import neo4j_password_env

        res["graph_store"] = Neo4jGraphStoreResource(url=s.neo4j_url, user=s.neo4j_user,
                                                     password=neo4j_password_env())
    return res


def k8s_resources(s: Settings) -> dict[str, Any]:
    """The local resources, with deploys, state and DR on the clusters of the kubeconfig."""
    from codemind_dagster.resources.clusters import ClusterMap
    from codemind_dagster.resources.kube_dr import KubeBackupStoreResource
    from codemind_dagster.resources.kube_runtime import KubeRuntimeResource
    from codemind_dagster.resources.kube_sandbox import KubeSandboxResource

    if not s.database_url or not s.database_url.startswith("postgresql"):
        raise RuntimeError(K8S_NEEDS_POSTGRES)
    res = local_resources(s)
    # Tests run where dev lives: code under test never reaches the production cluster.
    sandbox_context = ClusterMap.parse(s.kubeconfig_path, s.k8s_contexts).contexts["dev"]
    res["sandbox"] = KubeSandboxResource(
        root=str(s.sandbox_dir), timeout_s=s.sandbox_timeout_s, memory_mb=s.sandbox_memory_mb,
        coverage_threshold=s.coverage_threshold, repair_rounds=s.repair_rounds,
        kubeconfig_path=str(s.kubeconfig_path), context=sandbox_context)
    # DR drills also recover production into the dr cluster.
    res["backups"] = KubeBackupStoreResource(
        database=res["database"], root=str(s.backups_dir), artifacts_root=str(s.artifacts_dir),
        retention=s.backup_retention, kubeconfig_path=str(s.kubeconfig_path), k8s_contexts=s.k8s_contexts,
        k8s_namespaces=s.k8s_namespaces, health_timeout_s=s.health_timeout_s,
        keep_dr_releases=s.dr_keep_releases)
    # Each step of a run is its own pod: outputs pass through a store every pod reaches (S3 in a real cluster).
    res["io_manager"] = dg.FilesystemIOManager(base_dir=str(s.home / "dagster" / "io"))
    res["runtime"] = KubeRuntimeResource(kubeconfig_path=str(s.kubeconfig_path), k8s_contexts=s.k8s_contexts,
                                         k8s_namespaces=s.k8s_namespaces, health_timeout_s=s.health_timeout_s)
    return res


def resources_for(s: Settings) -> dict[str, Any]:
    return local_resources(s) if s.profile == "local" else k8s_resources(s)
