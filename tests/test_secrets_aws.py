"""Provider keys and the database URL from one Secrets Manager secret (moto), never shown anywhere."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

import boto3
import dagster as dg
import httpx
import pytest
from llm_standin import StandIn

from codemind_dagster.agents.planning import PLAN_TASK, PlanInput
from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.resources.llm.config import ProviderConfig, build_providers
from codemind_dagster.resources.llm.providers import Call
from codemind_dagster.resources.platform import DatabaseResource, ModelRouterResource
from codemind_dagster.resources.sandbox import SubprocessSandbox
from codemind_dagster.resources.secrets import (
    SecretError,
    SecretNotFound,
    SecretNotJson,
    SecretUnreachable,
    database_url_from_secret,
    fetch_secret,
)

pytestmark = pytest.mark.aws
SECRET_ID = "codemind/providers"
VALUES = {"ANTHROPIC_API_KEY": "sk-ant-api03-FROM-THE-SECRET-7f3a9c",
          "OPENAI_API_KEY": "sk-proj-FROM-THE-SECRET-b81d2e",
          "CODEMIND_DATABASE_URL": "postgresql+psycopg2://codemind:PW-FROM-THE-SECRET-55e1@db:5432/codemind"}
ROUTES = json.dumps({"planning": [["anthropic", "claude-sonnet-4-5", 4]]})


@pytest.fixture
def secrets(aws):
    client = boto3.client("secretsmanager", region_name="us-east-1")
    client.create_secret(Name=SECRET_ID, SecretString=json.dumps(VALUES))
    return client


@pytest.fixture
def plan_input(examples) -> PlanInput:
    return PlanInput(intent=read_intent_file(examples / "loyalty-points.yaml").canonical())


def router_resource(tmp_path, **fields) -> ModelRouterResource:
    return ModelRouterResource(database=DatabaseResource(url=f"sqlite:///{tmp_path / 'platform.db'}"),
                               daily_budget_usd=50, run_budget_usd=10, routing="providers", routes_json=ROUTES,
                               **fields)


def assert_nowhere(text: str, where: str) -> None:
    for name, value in VALUES.items():
        assert value not in text, f"{name} appears in {where}"


def test_keys_from_the_secret_reach_anthropic_instead_of_env_vars(secrets, monkeypatch, plan_input):
    with StandIn() as s:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-stale-key-in-the-environment")
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-only-in-the-environment")
        config = ProviderConfig.from_env(secret=fetch_secret(SECRET_ID))
        providers = build_providers(config)
        call = Call(task=PLAN_TASK, payload=plan_input, model="claude-sonnet-4-5", system=PLAN_TASK.system,
                    context=PLAN_TASK.context(plan_input), prompt=PLAN_TASK.render(plan_input),
                    max_tokens=PLAN_TASK.max_tokens, output_schema=PLAN_TASK.output.model_json_schema())
        completion = providers["anthropic"].complete(call)

        assert completion.output and s.last.headers["x-api-key"] == VALUES["ANTHROPIC_API_KEY"]
        assert config.openai_api_key.get_secret_value() == VALUES["OPENAI_API_KEY"]
        assert config.anthropic_base_url == s.url  # endpoints still come from the environment
        # Credentials come from the secret alone: a key only in the environment is not used.
        assert config.azure_openai_api_key is None
        assert providers["azure"].available()[0] is False
    assert ProviderConfig.from_env().anthropic_api_key.get_secret_value() == "sk-ant-stale-key-in-the-environment"


def test_without_a_secret_id_env_vars_stay_the_default(tmp_path, monkeypatch, plan_input):
    with StandIn() as s:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-the-env")
        res = router_resource(tmp_path)
        assert res.provider_secret() is None
        res.router().run(PLAN_TASK, plan_input, intent="loyalty-points")
        assert s.last.headers["x-api-key"] == "sk-ant-from-the-env"


def test_a_run_with_the_secret_shows_it_in_no_event_config_repr_or_env(secrets, tmp_path, monkeypatch, caplog,
                                                                       plan_input):
    caplog.set_level(logging.DEBUG)
    with StandIn() as s:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        res = router_resource(tmp_path, secret_id=SECRET_ID, secret_region="us-east-1")

        @dg.asset
        def planned(context, llm: ModelRouterResource) -> dg.MaterializeResult:
            router = llm.router()
            plan = router.run(PLAN_TASK, plan_input, intent="loyalty-points", run_id=context.run_id)
            context.log.info(f"marker-4c1e router {router!r} providers {router.providers!r} resource {llm!r}")
            return dg.MaterializeResult(metadata={"steps": len(plan.model_dump()), "resource": repr(llm)})

        instance = dg.DagsterInstance.ephemeral()
        defs = dg.Definitions(assets=[planned], resources={"llm": res})
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(instance=instance)

        assert result.success and s.last.headers["x-api-key"] == VALUES["ANTHROPIC_API_KEY"]
        events = [dg.serialize_value(entry) for entry in instance.all_logs(result.run_id)]
        assert sum("marker-4c1e" in e for e in events) == 1  # the grep below does see what the step logged
        for text in events:
            assert_nowhere(text, "the run's event log")
        run = instance.get_run_by_id(result.run_id)
        assert_nowhere(json.dumps(run.run_config, default=str), "the run config")
        assert_nowhere(dg.serialize_value(run.tags), "the run tags")
        shown = defs.get_repository_def().get_top_level_resources()["llm"].config_schema.default_value
        assert shown["secret_id"] == SECRET_ID
        assert_nowhere(json.dumps(shown, default=str), "the resource config")
        res.provider_secret()  # resolved on this instance too: its repr and dump must still hide the values
        assert_nowhere(repr(res) + str(res.model_dump()) + repr(res.provider_secret()), "reprs")
        assert_nowhere(repr(ProviderConfig.from_env(secret=res.provider_secret())), "ProviderConfig repr")
        assert_nowhere(caplog.text, "python logs")
        # Resolved into SecretStr values only: nothing was put into the process environment.
        assert_nowhere("\n".join(os.environ.values()), "os.environ")


def test_a_secret_in_the_parent_env_does_not_reach_the_sandbox(tmp_path, monkeypatch):
    for name, value in VALUES.items():
        monkeypatch.setenv(name, value)
    box = SubprocessSandbox(tmp_path / "sandbox", timeout_s=30, memory_mb=512)
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    result = box.run([sys.executable, "-c", dump], workdir=tmp_path / "sandbox" / "w")

    assert result.ok, result.stderr
    child = json.loads(result.stdout)
    assert not set(VALUES) & set(child)
    assert_nowhere(result.stdout, "the sandbox environment")


def test_the_database_url_comes_from_the_secret(secrets):
    url = database_url_from_secret(SECRET_ID, region_name="us-east-1")

    assert url.get_secret_value() == VALUES["CODEMIND_DATABASE_URL"]
    assert_nowhere(repr(url) + str(url), "the URL's repr")
    secrets.create_secret(Name="codemind/no-db", SecretString=json.dumps({"OPENAI_API_KEY": "sk-proj-x"}))
    with pytest.raises(SecretError, match="'codemind/no-db' has no CODEMIND_DATABASE_URL") as e:
        database_url_from_secret("codemind/no-db")
    assert "sk-proj-x" not in str(e.value)


def test_a_missing_secret_names_the_id_and_the_endpoint(aws, tmp_path):
    with pytest.raises(SecretNotFound, match=rf"secret 'codemind/absent' at {aws} does not exist"):
        fetch_secret("codemind/absent")
    with pytest.raises(ValueError, match="CODEMIND_AWS_SECRET_ID"):
        fetch_secret(" ")

    @dg.asset
    def needs_llm(llm: ModelRouterResource):
        llm.router()

    result = dg.materialize([needs_llm], resources={"llm": router_resource(tmp_path, secret_id="codemind/absent")},
                            raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_failure]
    assert "codemind/absent" in str(failure.event_specific_data.error.to_string())


@pytest.mark.parametrize(("stored", "message"), [
    ('{"ANTHROPIC_API_KEY": "TOPSECRET"', r"is not JSON \(line 1 column 34\)"),
    (json.dumps(["TOPSECRET-in-a-list"]), "is JSON but not an object of keys: found a list"),
    (json.dumps({"ANTHROPIC_API_KEY": "TOPSECRET", "TIMEOUT": 5}), "the values of TIMEOUT are not strings"),
])
def test_a_secret_that_is_not_a_json_object_of_strings_is_a_clear_error(secrets, stored, message):
    secrets.create_secret(Name="codemind/bad", SecretString=stored)
    with pytest.raises(SecretNotJson, match=message) as e:
        fetch_secret("codemind/bad")
    assert "codemind/bad" in str(e.value) and "TOPSECRET" not in str(e.value)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_a_binary_secret_is_a_clear_error(secrets):
    secrets.create_secret(Name="codemind/binary", SecretBinary=b"\x00TOPSECRET")
    with pytest.raises(SecretNotJson, match="'codemind/binary' .* holds binary data"):
        fetch_secret("codemind/binary")


@pytest.fixture
def iam_enforced(aws):
    """moto checks IAM from here on (it does not by default); switched back off after the test."""
    yield lambda: httpx.post(f"{aws}/moto-api/reset-auth", content=b"0", timeout=10).raise_for_status()
    httpx.post(f"{aws}/moto-api/reset-auth", content=b"inf", timeout=10).raise_for_status()


def test_access_denied_names_the_secret_and_the_endpoint(secrets, aws, monkeypatch, iam_enforced):
    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="no-secrets")
    key = iam.create_access_key(UserName="no-secrets")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    iam_enforced()

    with pytest.raises(SecretUnreachable, match=rf"secret '{SECRET_ID}' at {aws}: access denied") as e:
        fetch_secret(SECRET_ID)
    assert "GetSecretValue" in str(e.value)


def test_an_unreachable_endpoint_names_the_secret_and_the_endpoint(aws):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SecretUnreachable, match=rf"secret '{SECRET_ID}' at {closed} is unreachable"):
        fetch_secret(SECRET_ID, endpoint_url=closed)
