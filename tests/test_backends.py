"""The one switch: which graph, artifact, secret and cost backend is active, and whether it answers."""

from __future__ import annotations

import json
import socket

import boto3
import dagster as dg
import pytest
from click.testing import CliRunner

from codemind_dagster.resources.backends import Backends, display_url
from codemind_dagster.resources.probes import probe_backends
from codemind_dagster.settings import Settings


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults_are_the_embedded_stores():
    rows = {r["role"]: r["backend"] for r in Backends.from_settings(Settings.from_env({})).active()}
    assert rows == {"graph_store": "sql", "artifacts": "filesystem", "secrets": "environment",
                    "cloud_cost": "none"}
    assert probe_backends(Backends(), 0.5) == []


def test_the_settings_select_each_backend_and_no_credential_is_shown():
    env = {"CODEMIND_S3_ENDPOINT_URL": "https://alice:s3cret@s3.internal:9000", "CODEMIND_AWS_REGION": "eu-west-1",
           "CODEMIND_S3_BUCKET": "codemind-artifacts", "CODEMIND_AWS_SECRET_ID": "codemind/platform",
           "CODEMIND_AWS_COST": "true"}
    b = Backends.from_settings(Settings.from_env(env))
    rows = {r["role"]: r for r in b.active()}
    assert {r: rows[r]["backend"] for r in rows} == {"graph_store": "sql", "artifacts": "s3",
                                                     "secrets": "aws-secrets-manager",
                                                     "cloud_cost": "aws-cost-explorer"}
    text = json.dumps(b.active()) + repr(b)
    assert "s3cret" not in text and "alice" not in text
    assert rows["artifacts"]["target"] == "s3://codemind-artifacts at https://s3.internal:9000"
    assert rows["secrets"]["target"] == "codemind/platform (eu-west-1)"
    assert display_url("http://[bad") == "<unparseable url>" and display_url(None) == "-"


@pytest.mark.aws
def test_s3_and_secret_probes_answer_against_moto(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="codemind-probe")
    boto3.client("secretsmanager").create_secret(Name="codemind/probe", SecretString='{"OPENAI_API_KEY": "sk-9"}')
    b = Backends(s3_bucket="codemind-probe", s3_endpoint_url=aws, aws_secret_id="codemind/probe")
    probes = {p["name"]: p for p in probe_backends(b, 2.0)}
    assert probes["artifacts"]["healthy"] and probes["secrets"]["healthy"], probes
    assert "sk-9" not in json.dumps(probes)


@pytest.mark.aws
def test_missing_bucket_and_secret_are_unhealthy_with_the_name(aws):
    b = Backends(s3_bucket="codemind-absent", s3_endpoint_url=aws, aws_secret_id="codemind/absent")
    probes = {p["name"]: p for p in probe_backends(b, 2.0)}
    assert not probes["artifacts"]["healthy"] and "codemind-absent" in probes["artifacts"]["detail"]
    assert not probes["secrets"]["healthy"] and "ResourceNotFound" in probes["secrets"]["detail"]


def test_unreachable_stores_are_unhealthy_not_errors(monkeypatch):
    port = _closed_port()
    for var, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(var, value)
    b = Backends(s3_bucket="codemind-x",
                 s3_endpoint_url=f"http://127.0.0.1:{port}", aws_secret_id="codemind/x", aws_cost=True)
    probes = {p["name"]: p for p in probe_backends(b, 0.5)}
    assert [n for n, p in probes.items() if not p["healthy"]] == ["artifacts", "secrets"]
    assert f"127.0.0.1:{port}" in probes["artifacts"]["detail"]
    assert probes["cloud_cost"]["probed"] is False  # a Cost Explorer request is billed: never a health probe


@pytest.mark.aws
def test_llm_check_reports_the_backends_in_force(aws, monkeypatch):
    from codemind_dagster.cli import main

    boto3.client("s3").create_bucket(Bucket="codemind-cli")
    monkeypatch.setenv("CODEMIND_S3_BUCKET", "codemind-cli")
    monkeypatch.setenv("CODEMIND_S3_ENDPOINT_URL", aws)
    monkeypatch.setenv("CODEMIND_AWS_SECRET_ID", "codemind/none")
    r = CliRunner().invoke(main, ["llm", "check", "--json"])
    assert r.exit_code == 0, r.output
    rows = {b["role"]: b for b in json.loads(r.stdout)["backends"]}
    assert rows["artifacts"]["backend"] == "s3" and rows["artifacts"]["healthy"] is True
    assert rows["secrets"]["healthy"] is False and "codemind/none" in rows["secrets"]["detail"]
    assert rows["graph_store"] == {"role": "graph_store", "backend": "sql", "target": "platform database",
                                   "healthy": None, "detail": "platform database (embedded default)"}


@pytest.mark.aws
def test_infrastructure_state_lists_backends_and_probes_them(aws, settings):
    from codemind_dagster.assets.platform import infrastructure_state
    from codemind_dagster.resources.platform import DatabaseResource, RuntimeResource
    from codemind_dagster.resources.probes import ProbeResource

    boto3.client("s3").create_bucket(Bucket="codemind-state")
    probes = ProbeResource(s3_bucket="codemind-state", s3_endpoint_url=aws)
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([infrastructure_state], instance=instance, resources={
            "database": DatabaseResource(url=settings.db_url), "probes": probes,
            "runtime": RuntimeResource(root=str(settings.runtime_dir), health_timeout_s=5)})
    doc = result.output_for_node("infrastructure_state")
    assert [p["name"] for p in doc["supporting"]] == ["platform_db", "graph_store", "artifacts"]
    assert all(p["healthy"] for p in doc["supporting"])
    assert {b["role"]: b["backend"] for b in doc["backends"]}["artifacts"] == "s3"


def test_the_resolver_selects_the_configured_stores():
    from codemind_dagster.resources.artifacts_s3 import S3ArtifactStoreResource
    from codemind_dagster.resources.platform import ArtifactStoreResource, GraphStoreResource
    from codemind_dagster.resources.profiles import resources_for

    plain = resources_for(Settings.from_env({}))
    assert type(plain["artifacts"]) is ArtifactStoreResource and type(plain["graph_store"]) is GraphStoreResource
    env = {"CODEMIND_S3_BUCKET": "codemind-art", "CODEMIND_AWS_SECRET_ID": "codemind/keys", "CODEMIND_AWS_COST": "1"}
    res = resources_for(Settings.from_env(env))
    assert isinstance(res["artifacts"], S3ArtifactStoreResource) and res["artifacts"].bucket == "codemind-art"
    assert res["aws_cost"].enabled and not plain["aws_cost"].enabled
    assert res["llm"].secret_id == "codemind/keys"


@pytest.mark.aws
def test_the_k8s_profile_takes_its_database_url_from_the_secret(aws):
    from codemind_dagster.resources.secrets import SecretError

    url = "postgresql+psycopg2://app:pg-pass-5@db.internal:5432/codemind"
    boto3.client("secretsmanager").create_secret(
        Name="codemind/k8s-db", SecretString=json.dumps({"CODEMIND_DATABASE_URL": url}))
    env = {"CODEMIND_PROFILE": "k8s", "CODEMIND_AWS_SECRET_ID": "codemind/k8s-db"}
    assert Settings.from_env(env).db_url == url
    # An explicit URL wins, and the local profile never fetches it (SQLite stays its default).
    assert Settings.from_env({**env, "CODEMIND_DATABASE_URL": "postgresql://x@h/y"}).db_url == "postgresql://x@h/y"
    assert Settings.from_env({**env, "CODEMIND_PROFILE": "local"}).db_url.startswith("sqlite:///")
    boto3.client("secretsmanager").create_secret(Name="codemind/no-db", SecretString='{"OPENAI_API_KEY": "k"}')
    with pytest.raises(SecretError, match="codemind/no-db.*has no CODEMIND_DATABASE_URL"):
        Settings.from_env({**env, "CODEMIND_AWS_SECRET_ID": "codemind/no-db"})


def test_a_neo4j_url_selects_the_neo4j_graph_store_and_keeps_the_password_a_reference(monkeypatch):
    from codemind_dagster.resources.graph_neo4j import Neo4jGraphStoreResource
    from codemind_dagster.resources.profiles import resources_for

    env = {"CODEMIND_NEO4J_URL": "bolt://bob:pw-in-url@graph.internal:7687", "CODEMIND_NEO4J_USER": "codemind"}
    rows = {r["role"]: r for r in Backends.from_settings(Settings.from_env(env)).active()}
    assert rows["graph_store"] == {"role": "graph_store", "backend": "neo4j",
                                   "target": "bolt://graph.internal:7687 (user codemind)"}
    monkeypatch.setenv("CODEMIND_NEO4J_PASSWORD", "n4j-secret-1")
    res = resources_for(Settings.from_env(env))
    graph = res["graph_store"]
    assert isinstance(graph, Neo4jGraphStoreResource) and graph.user == "codemind"
    assert isinstance(graph.password, dg.EnvVar) and graph.password.env_var_name == "CODEMIND_NEO4J_PASSWORD"
    assert "n4j-secret-1" not in repr(graph) + repr(res["probes"])
    monkeypatch.delenv("CODEMIND_NEO4J_PASSWORD")
    assert resources_for(Settings.from_env(env))["graph_store"].password is None


@pytest.mark.neo4j
def test_the_neo4j_probe_answers_and_names_a_wrong_password(neo4j_server):
    b = Backends(neo4j_url=neo4j_server.url, neo4j_user=neo4j_server.user)
    ok = probe_backends(b, 5.0, neo4j_server.password)
    assert [(p["name"], p["healthy"]) for p in ok] == [("graph_store", True)], ok
    bad = probe_backends(b, 5.0, "not-the-password")[0]
    assert not bad["healthy"] and "refused user 'neo4j'" in bad["detail"]
    assert "not-the-password" not in bad["detail"] and neo4j_server.password not in bad["detail"]


def test_an_unreachable_neo4j_is_unhealthy_not_an_error():
    port = _closed_port()
    probe = probe_backends(Backends(neo4j_url=f"bolt://127.0.0.1:{port}"), 0.5, "pw")[0]
    assert probe["name"] == "graph_store" and not probe["healthy"]
    assert f"127.0.0.1:{port}" in probe["detail"] and "not reachable" in probe["detail"]


@pytest.mark.neo4j
def test_llm_check_and_state_probe_neo4j_as_the_graph_store(neo4j_server, settings, monkeypatch):
    from codemind_dagster.assets.platform import infrastructure_state
    from codemind_dagster.cli import main
    from codemind_dagster.resources.platform import DatabaseResource, RuntimeResource
    from codemind_dagster.resources.probes import ProbeResource

    monkeypatch.setenv("CODEMIND_NEO4J_URL", neo4j_server.url)
    monkeypatch.setenv("CODEMIND_NEO4J_PASSWORD", neo4j_server.password)
    r = CliRunner().invoke(main, ["llm", "check", "--json"])
    assert r.exit_code == 0, r.output
    graph = {b["role"]: b for b in json.loads(r.stdout)["backends"]}["graph_store"]
    assert graph["backend"] == "neo4j" and graph["healthy"] is True, graph
    assert neo4j_server.password not in r.stdout
    probes = ProbeResource.from_settings(Settings.from_env())
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([infrastructure_state], instance=instance, resources={
            "database": DatabaseResource(url=settings.db_url), "probes": probes,
            "runtime": RuntimeResource(root=str(settings.runtime_dir), health_timeout_s=5)})
    supporting = {p["name"]: p for p in result.output_for_node("infrastructure_state")["supporting"]}
    assert supporting["graph_store"]["healthy"] and "neo4j bolt://127.0.0.1" in supporting["graph_store"]["detail"]
