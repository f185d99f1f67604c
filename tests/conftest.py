"""Shared fixtures: every test writes under its own temporary CODEMIND_HOME and stops what it starts."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "intents"
PG_ADMIN_URL = os.environ.get("CODEMIND_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def codemind_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "codemind-home"
    monkeypatch.setenv("CODEMIND_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.delenv("CODEMIND_DATABASE_URL", raising=False)
    monkeypatch.setenv("CODEMIND_HEALTH_TIMEOUT_S", "20")
    return home


@pytest.fixture
def settings(codemind_home: Path):
    from codemind_dagster.settings import Settings

    return Settings.from_env()


@pytest.fixture
def runtime_cleanup(settings):
    """Stops every deployment a test made, even when it fails."""
    yield
    from codemind_dagster.resources.runtime import LocalRuntime

    LocalRuntime(settings.runtime_dir).stop_all()


@contextlib.contextmanager
def _new_database(prefix: str):
    """A database of its own on the local PostgreSQL server, dropped (connections and all) on exit."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {e.orig}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from codemind_dagster.resources.database import _ENGINES

        if url in _ENGINES:
            _ENGINES.pop(url).dispose()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh database on the local PostgreSQL server, dropped after the session."""
    with _new_database("codemind_test") as url:
        yield url


@pytest.fixture
def fresh_pg_url() -> str:
    """A database for one test only (the k8s profile's platform tables and Dagster instance), dropped after it."""
    with _new_database("codemind_one") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path: Path):
    """The platform DB on SQLite and on PostgreSQL: same code, same migrations."""
    from codemind_dagster.resources.database import PlatformDB

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'platform.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        import sqlalchemy as sa

        from codemind_dagster.resources.tables import metadata

        # Each test starts from an empty schema on the shared session database.
        eng = sa.create_engine(url)
        with eng.begin() as c:
            metadata.drop_all(c)
            c.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        eng.dispose()
    database = PlatformDB(url)
    database.migrate()
    return database


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def kube(tmp_path_factory):
    """Both local control planes (clusters `main` and `dr`, with node agents and the shared CRDs), for the session.

    Yields the home whose kube/config holds the contexts dev-staging, production and dr.
    """
    import shutil

    from devcluster import build, cluster

    if not build.built() and shutil.which("go") is None:
        missing = "Go 1.26+ to build the control plane (then: make k8s-build)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"k8s tests need {missing}")
        pytest.skip(f"k8s tests need {missing}")
    home = tmp_path_factory.mktemp("kube-home")
    clusters = cluster.up(home)
    try:
        yield KubeHome(home, {c.name: c for c in clusters})
    finally:
        for c in clusters:
            c.stop()


class KubeHome:
    """The clusters of the `kube` fixture: their kubeconfig and API clients per context."""

    def __init__(self, home: Path, clusters: dict):
        self.home = home
        self.clusters = clusters
        self.kubeconfig = home / "kube" / "config"

    def api(self, context: str = "dev-staging"):
        from kubernetes import config

        return config.new_client_from_config(str(self.kubeconfig), context=context)


def missing_component(what: str, setup: str) -> None:
    """A real component is missing: a setup failure in CI, elsewhere a skip naming the command that sets it up."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing (CI never skips it): {setup}")
    pytest.skip(f"{what} is missing: {setup}")


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """moto's server on a free loopback port for the session: a real HTTP endpoint boto3 talks to unchanged."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        missing_component("moto's server (moto[server])", "make setup")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS SDK clients of this test reach moto's server with throwaway keys; its state is reset first."""
    import httpx

    httpx.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    for var, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return moto_endpoint


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory):
    """A real Neo4j (Maven Central's test harness on the machine's Java) on a free loopback port, for the session."""
    from devservices import neo4j

    if not neo4j.built() and (missing := neo4j.missing_tools()):
        missing_component(f"{', '.join(missing)} (to build and run Neo4j {neo4j.HARNESS_VERSION})",
                          "apt-get install openjdk-17-jdk-headless maven, then python -m devservices.neo4j build")
    if neo4j.missing_tools(for_build=False):
        missing_component("java (to run Neo4j)", "apt-get install openjdk-17-jdk-headless")
    neo4j.build()
    with neo4j.start(tmp_path_factory.mktemp("neo4j")) as server:
        yield server


@pytest.fixture(scope="session")
def neo4j_url(neo4j_server) -> str:
    """The session's Neo4j Bolt URL; its user and password are neo4j_server.user and .password."""
    return neo4j_server.url


@pytest.fixture
def neo4j_graph(neo4j_server):
    """A Neo4jGraphStore on the session's server, whose database is emptied first (schema kept)."""
    from codemind_dagster.resources.graph_neo4j import Neo4jGraphStore

    store = Neo4jGraphStore(neo4j_server.url, neo4j_server.user, neo4j_server.password)
    store.query("MATCH (n) DETACH DELETE n")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def rt(tmp_path: Path):
    """A LocalRuntime under the test's temp dir; every process it started is gone afterwards."""
    from codemind_dagster.resources.runtime import LocalRuntime
    from tests.runtime_procs import ours

    # A generous timeout costs nothing when healthy; the failure tests use their own short one.
    runtime = LocalRuntime(tmp_path / "runtime", health_timeout_s=30, stop_grace_s=3)
    try:
        yield runtime
    finally:
        runtime.stop_all()
        assert ours(runtime.root) == []


@pytest.fixture
def bundle(tmp_path: Path):
    """bundle(name, source=HEALTHY): a bundle under the temp dir whose app.py is `source` with its name filled in."""
    import textwrap

    from tests.runtime_procs import HEALTHY

    def make(name: str, source: str = HEALTHY) -> Path:
        app = tmp_path / "bundles" / name / "service" / "app.py"
        app.parent.mkdir(parents=True)
        app.write_text(textwrap.dedent(source % {"version": name}))
        return app.parent.parent

    return make

