"""The Dagster instance of each profile: SQLite under CODEMIND_HOME (local), PostgreSQL and K8sRunLauncher (k8s)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import yaml

from codemind_dagster.settings import Settings

# A dagster.yaml that starts with this line is ours to rewrite when the profile changes; any other is the user's.
MANAGED = "# managed by codemind: edit freely after deleting this line\n"
DAGSTER_SCHEMA = "dagster"  # the instance's tables live beside the platform's, in their own schema
PG_URL_ENV = "CODEMIND_DAGSTER_PG_URL"
RUN_NAMESPACE = "codemind-system"
RUN_IMAGE = "codemind/code-location:dev"
INSTANCE_CONFIGMAP = "codemind-dagster-instance"
RUN_SERVICE_ACCOUNT = "codemind-run-worker"
POD_DAGSTER_HOME = "/opt/dagster/dagster_home"
# What a run pod needs from the launching process's environment to build the same definitions.
PASSED_ENV = ("CODEMIND_PROFILE", "CODEMIND_DATABASE_URL", "CODEMIND_K8S_CONTEXTS", "CODEMIND_K8S_NAMESPACES", "CODEMIND_REDIS_URL", "CODEMIND_LLM_ROUTING",
              "CODEMIND_HEALTH_TIMEOUT_S", "CODEMIND_DR_KEEP_RELEASES", PG_URL_ENV,
              "CODEMIND_LOADTEST_DURATION_S", "CODEMIND_LOADTEST_CONCURRENCY",
              # The production stores: each step pod resolves the same backends (and the secret) itself.
              "CODEMIND_S3_BUCKET", "CODEMIND_S3_ENDPOINT_URL", "CODEMIND_AWS_REGION", "CODEMIND_AWS_SECRET_ID",
              "CODEMIND_AWS_COST", "CODEMIND_AWS_BUDGETS", "CODEMIND_NEO4J_URL", "CODEMIND_NEO4J_USER",
              "CODEMIND_NEO4J_PASSWORD", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY")

# What earlier versions wrote, without the marker: still ours.
LEGACY = ("telemetry:\n  enabled: false\nnux:\n  enabled: false\nrun_coordinator:\n  module: dagster.core.run_coordinator\n"
          "  class: QueuedRunCoordinator\n  config:\n    max_concurrent_runs: 2\n")

LOCAL = {
    "telemetry": {"enabled": False},
    "nux": {"enabled": False},
    "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                        "config": {"max_concurrent_runs": 2}},
}


def dagster_yaml(settings: Settings) -> str:
    """The text of the profile's managed dagster.yaml."""
    return MANAGED + yaml.safe_dump(dagster_config(settings), sort_keys=False)


def dagster_pg_url(database_url: str) -> str:
    """The platform DB's URL with the instance schema first on the search path."""
    base = database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={DAGSTER_SCHEMA}', safe='')}"


def dagster_config(settings: Settings) -> dict:
    """dagster.yaml of the profile; the k8s one launches every run as a Job with K8sRunLauncher."""
    if settings.profile != "k8s":
        return LOCAL
    return {
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
        "storage": {"postgres": {"postgres_url": {"env": PG_URL_ENV}}},
        # Submitted runs go straight to the launcher: in a cluster the chart's daemon queues them instead.
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "load_incluster_config": False,
            "kubeconfig_file": str(settings.kubeconfig_path),
            "job_namespace": RUN_NAMESPACE,
            "job_image": RUN_IMAGE,
            "service_account_name": RUN_SERVICE_ACCOUNT,
            "image_pull_policy": "IfNotPresent",
            "instance_config_map": INSTANCE_CONFIGMAP,
            "dagster_home": POD_DAGSTER_HOME,
            # Paths by value, resolved here: a run pod starts in another working directory than the launcher.
            # The rest by name: values (a DB password among them) are read from the launcher's env, never written here.
            "env_vars": [f"CODEMIND_HOME={settings.home.resolve()}",
                         f"CODEMIND_KUBECONFIG={settings.kubeconfig_path.resolve()}",
                         *(n for n in PASSED_ENV if os.environ.get(n))],
            "labels": {"app.kubernetes.io/part-of": "codemind"},
        }},
    }


def ensure_dagster_home(settings: Settings) -> str:
    """Point DAGSTER_HOME at CODEMIND_HOME/dagster (unless set) and give it the profile's dagster.yaml."""
    home = os.environ.get("DAGSTER_HOME") or str(settings.dagster_home)
    os.makedirs(home, exist_ok=True)
    cfg = os.path.join(home, "dagster.yaml")
    if settings.profile == "k8s" and settings.database_url:
        os.environ.setdefault(PG_URL_ENV, dagster_pg_url(settings.database_url))
        _ensure_schema(settings.database_url)
    want = dagster_yaml(settings)
    current = Path(cfg).read_text() if os.path.exists(cfg) else None
    if current is None or current == LEGACY or (current.startswith(MANAGED) and current != want):
        with open(cfg, "w") as f:
            f.write(want)
    os.environ["DAGSTER_HOME"] = home
    return home


def _ensure_schema(database_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{DAGSTER_SCHEMA}"'))
    finally:
        engine.dispose()


def publish_instance_config(settings: Settings) -> None:
    """Namespace and ConfigMap the run pods mount as DAGSTER_HOME: the same dagster.yaml as this process."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = config.new_client_from_config(str(settings.kubeconfig_path))
    core = client.CoreV1Api(api)
    labels = {"app.kubernetes.io/managed-by": "codemind"}
    try:
        core.create_namespace({"metadata": {"name": RUN_NAMESPACE, "labels": labels}})
    except ApiException as e:
        if e.status != 409:
            raise
    try:
        core.create_namespaced_service_account(RUN_NAMESPACE, {"metadata": {"name": RUN_SERVICE_ACCOUNT,
                                                                            "labels": labels}})
    except ApiException as e:
        if e.status != 409:
            raise
    body = {"metadata": {"name": INSTANCE_CONFIGMAP, "namespace": RUN_NAMESPACE, "labels": labels},
            "data": {"dagster.yaml": yaml.safe_dump(dagster_config(settings), sort_keys=False)}}
    try:
        core.replace_namespaced_config_map(INSTANCE_CONFIGMAP, RUN_NAMESPACE, body)
    except ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(RUN_NAMESPACE, body)


def get_instance(settings: Settings):
    import dagster as dg

    ensure_dagster_home(settings)
    return dg.DagsterInstance.get()
