"""The hosted providers through the real SDKs against the local stand-in: wire format, usage, errors."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from llm_standin import StandIn, offline_solver, task_name, user_text

from codemind_dagster.agents.coding import CODE_TASK, CodeInput, code_offline
from codemind_dagster.agents.planning import PLAN_TASK, PlanInput, plan_offline
from codemind_dagster.agents.testing import CONTRACT_TASK, ContractInput, contract_offline
from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.resources.llm.anthropic_provider import json_body, token_counts
from codemind_dagster.resources.llm.config import ProviderConfig, build_providers
from codemind_dagster.resources.llm.errors import (
    FatalError,
    OutputError,
    ProviderUnavailable,
    SpendLimitError,
    TransientError,
)
from codemind_dagster.resources.llm.providers import Call
from codemind_dagster.resources.llm.usage import Usage

ANTHROPIC_FAMILY, OPENAI_FAMILY = ("anthropic", "bedrock"), ("openai", "azure")
ALL = ANTHROPIC_FAMILY + OPENAI_FAMILY
MODELS = {"anthropic": "claude-sonnet-4-5", "bedrock": "anthropic.claude-sonnet-4-5-20250929-v1:0",
          "openai": "gpt-4.1", "azure": "gpt41-prod-deployment"}
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-api03-TOPSECRET-anthropic", "OPENAI_API_KEY": "sk-proj-TOPSECRET-openai",
           "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/TOPSECRET/bPxRfiCY",
           "AZURE_OPENAI_API_KEY": "azure-TOPSECRET-0123456789abcdef"}


@pytest.fixture(scope="module")
def intent() -> dict:
    return read_intent_file(Path(__file__).resolve().parent.parent / "examples" / "intents" / "loyalty-points.yaml"
                            ).canonical()


@pytest.fixture
def standin():
    with StandIn() as s:
        yield s


def providers_for(s: StandIn, timeout_s: float = 10.0) -> dict:
    return build_providers(s.config(**SECRETS, CODEMIND_LLM_TIMEOUT_S=timeout_s))


def make_call(task, payload, family: str, feedback: str | None = None) -> Call:
    return Call(task=task, payload=payload, model=MODELS[family], system=task.system,
                context=task.context(payload), prompt=task.render(payload), max_tokens=task.max_tokens,
                output_schema=task.output.model_json_schema(), feedback=feedback)


@pytest.fixture
def plan_call(intent):
    return lambda family, feedback=None: make_call(PLAN_TASK, PlanInput(intent=intent), family, feedback)


# ---------------------------------------------------------------------------------------------------------
# Structured output and the request on the wire


@pytest.mark.parametrize("family", ANTHROPIC_FAMILY)
def test_tool_use_structured_output_with_cache_breakpoints(standin, plan_call, intent, family):
    call = plan_call(family)
    completion = providers_for(standin)[family].complete(call)

    assert completion.output == plan_offline(PlanInput(intent=intent)).model_dump(mode="json")
    assert json.loads(completion.raw) == completion.output
    [req] = standin.requests
    body = req.json
    assert body["tools"] == [{"name": "submit_planning", "input_schema": call.output_schema,
                              "description": body["tools"][0]["description"]}]
    assert body["tool_choice"] == {"type": "tool", "name": "submit_planning"}
    assert body["system"] == [{"type": "text", "text": PLAN_TASK.system, "cache_control": {"type": "ephemeral"}}]
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": call.context, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": call.prompt}]}]
    assert body["max_tokens"] == PLAN_TASK.max_tokens
    if family == "anthropic":
        assert req.path == "/v1/messages" and body["model"] == MODELS["anthropic"]
        assert req.headers["x-api-key"] == SECRETS["ANTHROPIC_API_KEY"]
    else:
        assert req.path == f"/model/{MODELS['bedrock']}/invoke"
        assert "model" not in body and body["anthropic_version"] == "bedrock-2023-05-31"
        auth = req.headers["authorization"]
        assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={SECRETS['AWS_ACCESS_KEY_ID']}/")
        assert "/us-east-1/bedrock/aws4_request" in auth and "Signature=" in auth
        assert "x-amz-date" in req.headers and "x-api-key" not in req.headers


@pytest.mark.parametrize("family", OPENAI_FAMILY)
def test_json_schema_structured_output(standin, plan_call, intent, family):
    call = plan_call(family)
    completion = providers_for(standin)[family].complete(call)

    assert completion.output == plan_offline(PlanInput(intent=intent)).model_dump(mode="json")
    [req] = standin.requests
    body = req.json
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "planning", "schema": call.output_schema, "strict": False}}
    assert body["messages"] == [
        {"role": "system", "content": PLAN_TASK.system},
        {"role": "user", "content": [{"type": "text", "text": call.context}, {"type": "text", "text": call.prompt}]}]
    assert body["max_completion_tokens"] == PLAN_TASK.max_tokens
    if family == "openai":
        assert req.path == "/v1/chat/completions" and body["model"] == MODELS["openai"]
        assert req.headers["authorization"] == f"Bearer {SECRETS['OPENAI_API_KEY']}"
    else:
        assert req.path == f"/openai/deployments/{MODELS['azure']}/chat/completions"
        assert req.query == {"api-version": "2024-10-21"}
        assert req.headers["api-key"] == SECRETS["AZURE_OPENAI_API_KEY"]


@pytest.mark.parametrize("family", ALL)
def test_feedback_is_a_final_user_block(standin, plan_call, family):
    providers_for(standin)[family].complete(plan_call(family, feedback="routes is empty"))
    last = standin.last.json["messages"][-1]["content"][-1]
    assert last["text"].startswith("Your previous answer was rejected: routes is empty. ")
    assert "cache_control" not in last
    if family in ANTHROPIC_FAMILY:
        assert last["text"].endswith("Call the tool again with a corrected answer.")


# ---------------------------------------------------------------------------------------------------------
# Usage


@pytest.mark.parametrize("family", ANTHROPIC_FAMILY)
def test_anthropic_usage_is_taken_as_is_because_input_excludes_cache(standin, plan_call, family):
    standin.respond({"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
                     "content": [{"type": "tool_use", "id": "toolu_1", "name": "submit_planning", "input": {"a": 1}}],
                     "usage": {"input_tokens": 11, "cache_creation_input_tokens": 22,
                               "cache_read_input_tokens": 33, "output_tokens": 44}})
    completion = providers_for(standin)[family].complete(plan_call(family))
    assert completion.output == {"a": 1}
    assert completion.usage == Usage(input_tokens=11, cache_write_tokens=22, cache_read_tokens=33, output_tokens=44)


@pytest.mark.parametrize("family", OPENAI_FAMILY)
def test_openai_usage_splits_cached_and_reasoning_tokens_out(standin, plan_call, family):
    standin.respond({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": '{"a": 1}'}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
                  "prompt_tokens_details": {"cached_tokens": 60},
                  "completion_tokens_details": {"reasoning_tokens": 20}}})
    completion = providers_for(standin)[family].complete(plan_call(family))
    assert completion.usage == Usage(input_tokens=40, cache_read_tokens=60, output_tokens=30, reasoning_tokens=20)


@pytest.mark.parametrize("family", ALL)
def test_repeated_stable_prefix_is_read_from_the_cache(plan_call, family):
    with StandIn(reasoning_tokens=16) as s:
        provider = providers_for(s)[family]
        first, second = provider.complete(plan_call(family)).usage, provider.complete(plan_call(family)).usage
    assert first.cache_read_tokens == 0 and first.input_tokens > 0
    if family in ANTHROPIC_FAMILY:
        assert second.input_tokens == first.input_tokens  # only the prompt is uncached, both times
        assert first.cache_write_tokens > 0 and second.cache_write_tokens == 0
        assert second.cache_read_tokens == first.cache_write_tokens
        assert first.reasoning_tokens == 0
    else:
        assert first.cache_write_tokens == second.cache_write_tokens == 0
        assert second.cache_read_tokens > 0 and first.input_tokens == second.input_tokens + second.cache_read_tokens
        assert first.reasoning_tokens == second.reasoning_tokens == 16
    assert second.output_tokens == first.output_tokens > 0


# ---------------------------------------------------------------------------------------------------------
# Errors: one HTTP request per complete(), mapped to the router's classes


ERROR_CASES = [
    # (families, stand-in error kwargs, expected class, status, retry_after_s)
    (ALL, {"status": 429, "headers": {"retry-after-ms": "250", "retry-after": "9"}}, TransientError, 429, 0.25),
    (ALL, {"status": 429, "headers": {"retry-after": "3"}}, TransientError, 429, 3.0),
    (ALL, {"status": 408}, TransientError, 408, None),
    (ALL, {"status": 409}, TransientError, 409, None),
    (ALL, {"status": 500}, TransientError, 500, None),
    (ALL, {"status": 503}, TransientError, 503, None),
    (ALL, {"status": 529, "type": "overloaded_error", "message": "Overloaded"}, TransientError, 529, None),
    (ALL, {"status": 400, "message": "messages: field required"}, FatalError, 400, None),
    (ALL, {"status": 401, "message": "invalid x-api-key"}, FatalError, 401, None),
    (ALL, {"status": 403}, FatalError, 403, None),
    (ALL, {"status": 404, "message": "model not found"}, FatalError, 404, None),
    (ANTHROPIC_FAMILY, {"status": 400, "message": "Your credit balance is too low to access the Anthropic API. "
                        "Please go to Plans & Billing to upgrade or purchase credits."}, SpendLimitError, 400, None),
    (("anthropic",), {"status": 402, "type": "billing_error", "message": "payment required"}, SpendLimitError, 402, None),
    (OPENAI_FAMILY, {"status": 429, "type": "insufficient_quota", "code": "insufficient_quota", "message": (
        "You exceeded your current quota, please check your plan and billing details.")}, SpendLimitError, 429, None),
]


@pytest.mark.parametrize("family,kwargs,expected,status,retry_after", [
    pytest.param(f, kw, exp, st, ra, id=f"{f}-{st}-{exp.__name__}-{i}")
    for i, (families, kw, exp, st, ra) in enumerate(ERROR_CASES) for f in families])
def test_http_errors_map_to_router_errors_with_one_request(standin, plan_call, family, kwargs, expected, status,
                                                           retry_after):
    standin.error(**kwargs)
    with pytest.raises(expected) as info:
        providers_for(standin)[family].complete(plan_call(family))
    err = info.value
    assert type(err) is expected  # a credit error is a SpendLimitError, never a plain FatalError
    assert err.provider == family and err.status == status
    assert err.retry_after_s == pytest.approx(retry_after) if retry_after is not None else err.retry_after_s is None
    assert len(standin.requests) == 1  # the SDK's own retries are off; the router decides
    if "message" in kwargs and family != "bedrock":
        assert kwargs["message"][:20] in str(err)


@pytest.mark.parametrize("family", ALL)
def test_a_hang_past_the_client_timeout_is_transient_and_fast(plan_call, family):
    with StandIn() as s:
        s.hang(30)
        provider = providers_for(s, timeout_s=0.3)[family]
        started = time.monotonic()
        with pytest.raises(TransientError, match="client timeout of 0.3s"):
            provider.complete(plan_call(family))
        assert time.monotonic() - started < 3
        assert len(s.requests) == 1
        # The same provider answers the next call: a timeout does not poison the client.
        assert provider.complete(plan_call(family)).output["routes"]


@pytest.mark.parametrize("family", ALL)
def test_connection_refused_is_transient(plan_call, family):
    s = StandIn().start()
    config = s.config(**SECRETS)
    s.stop()  # nothing listens on the port now
    with pytest.raises(TransientError, match="connection failed"):
        build_providers(config)[family].complete(plan_call(family))


# ---------------------------------------------------------------------------------------------------------
# Malformed output


@pytest.mark.parametrize("family", ALL)
def test_an_answer_that_is_not_the_structured_output_is_an_output_error(standin, plan_call, family):
    standin.malformed("Here is your plan: {routes: [oops")
    with pytest.raises(OutputError) as info:
        providers_for(standin)[family].complete(plan_call(family))
    assert info.value.raw == "Here is your plan: {routes: [oops"
    assert info.value.usage.output_tokens > 0  # the router's ledger records what the bad answer cost
    assert ("without calling submit_planning" if family in ANTHROPIC_FAMILY else "not valid JSON") in str(info.value)
    assert len(standin.requests) == 1


@pytest.mark.parametrize("family", ALL)
def test_a_body_that_is_not_json_is_an_output_error(standin, plan_call, family):
    standin.malformed("<html>502 from a proxy</html>", kind="body")
    with pytest.raises(OutputError) as info:
        providers_for(standin)[family].complete(plan_call(family))
    assert info.value.raw == "<html>502 from a proxy</html>"


_TOOL = {"type": "tool_use", "id": "t", "name": "submit_planning", "input": {"intent": "x"}}
_USAGE = {"input_tokens": 12, "output_tokens": 34}


@pytest.mark.parametrize("family", ANTHROPIC_FAMILY)
@pytest.mark.parametrize(("body", "says", "billed"), [
    ([_TOOL], "not a JSON object", False),
    ({"type": "message", "usage": _USAGE}, "unexpected response shape: no content", True),
    ({"content": {"type": "tool_use"}, "usage": _USAGE}, "unexpected response shape: content is not a list", True),
    ({"content": [{"type": "tool_use", "id": "t"}], "usage": _USAGE}, "the tool_use block has no input", True),
    ({"content": [_TOOL], "usage": {"input_tokens": "many"}}, "unexpected response shape: no readable usage", False),
    ({"content": [_TOOL], "usage": [1, 2]}, "unexpected response shape: no readable usage", False),
    ({"content": [{"type": "tool_use", "input": ["a"]}], "usage": _USAGE}, "not a JSON object", True),
])
def test_a_response_of_the_wrong_shape_is_an_output_error(standin, plan_call, family, body, says, billed):
    """The answer is read from the raw body: any shape but a Messages response fails clearly, usage kept."""
    standin.respond(body)
    with pytest.raises(OutputError, match=re.escape(says)) as info:
        providers_for(standin)[family].complete(plan_call(family))
    assert info.value.raw
    usage = getattr(info.value, "usage", None)
    if billed:
        assert (usage.input_tokens, usage.output_tokens) == (12, 34)
    else:
        assert usage is None  # the router prices the attempt from its estimates


_CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 34}


@pytest.mark.parametrize("family", OPENAI_FAMILY)
@pytest.mark.parametrize(("body", "says", "billed"), [
    (["choices"], "not a JSON object", False),
    ({"choices": [], "usage": _CHAT_USAGE}, "the response has no choices", True),
    ({"choices": [{"message": "hi"}], "usage": _CHAT_USAGE}, "no message in the first choice", True),
    ({"choices": {"0": {}}, "usage": _CHAT_USAGE}, "no message in the first choice", True),
    ({"choices": [{"message": {"content": ["a"]}}], "usage": _CHAT_USAGE}, "the message content is not text", True),
    ({"choices": [{"message": {"content": "{}"}}], "usage": {"prompt_tokens": "many"}},
     "unexpected response shape: no readable usage", False),
])
def test_a_chat_response_of_the_wrong_shape_is_an_output_error(standin, plan_call, family, body, says, billed):
    """As for Claude: any shape but a Chat Completions response fails clearly, with the usage it reported."""
    standin.respond(body)
    with pytest.raises(OutputError, match=re.escape(says)) as info:
        providers_for(standin)[family].complete(plan_call(family))
    usage = getattr(info.value, "usage", None)
    if billed:
        assert (usage.input_tokens, usage.output_tokens) == (12, 34)
    else:
        assert usage is None


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b'{"usage": NaN}', b'{"n": Infinity}', b"[" * 100_000,
                                     b"<html>502</html>", b""])
def test_a_body_that_is_not_json_keeps_its_text(content):
    with pytest.raises(OutputError, match="the response body is not JSON") as info:
        json_body("anthropic", content)
    assert info.value.raw == content[:10_000].decode(errors="replace")


def test_token_counts_take_only_non_negative_numbers():
    assert token_counts({"a": 3, "b": 2.0}, "a", "b", "c") == [3, 2, 0]  # a count not reported is 0
    assert token_counts({"a": None}, "a") == [0]
    for bad in (-1, 2.5, True, "3", [1], float("inf"), float("nan"), 2**60):
        assert token_counts({"a": bad}, "a") is None, bad
    assert token_counts(None, "a") is None and token_counts([1], "a") is None


def test_a_refusal_is_an_output_error(standin, plan_call):
    standin.respond({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."}}]})
    with pytest.raises(OutputError, match="refused") as info:
        providers_for(standin)["openai"].complete(plan_call("openai"))
    assert info.value.raw == "I can't help with that."


def test_a_tool_call_cut_off_at_max_tokens_is_an_output_error(standin, plan_call):
    standin.respond({"id": "m", "type": "message", "role": "assistant", "model": "m", "stop_reason": "max_tokens",
                     "content": [{"type": "tool_use", "id": "t", "name": "submit_planning", "input": {"intent": "x"}}],
                     "usage": {"input_tokens": 1, "output_tokens": 4096}})
    with pytest.raises(OutputError, match="cut off at max_tokens=4096"):
        providers_for(standin)["anthropic"].complete(plan_call("anthropic"))


# ---------------------------------------------------------------------------------------------------------
# Configuration, availability and secrets


def test_unconfigured_providers_are_unavailable_and_never_touch_the_network(standin, plan_call):
    config = ProviderConfig(anthropic_base_url=standin.url, openai_base_url=standin.openai_url,
                            bedrock_base_url=standin.url, bedrock_region="us-east-1",
                            azure_openai_endpoint=standin.url)
    providers = build_providers(config)
    assert set(providers) == {"anthropic", "bedrock", "openai", "azure", "offline"}
    expected = {"anthropic": "ANTHROPIC_API_KEY is not set",
                "bedrock": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set",
                "openai": "OPENAI_API_KEY is not set", "azure": "AZURE_OPENAI_API_KEY is not set"}
    for family, message in expected.items():
        assert providers[family].available() == (False, message)
        with pytest.raises(ProviderUnavailable, match=message):
            providers[family].complete(plan_call(family))
        assert not providers[family]._client.built
    assert providers["offline"].available()[0]
    assert standin.requests == []


def test_missing_region_and_endpoint_are_reported():
    providers = build_providers(ProviderConfig.from_env({"AWS_ACCESS_KEY_ID": "AKIAX", "AWS_SECRET_ACCESS_KEY": "s",
                                                         "AZURE_OPENAI_API_KEY": "k"}))
    assert providers["bedrock"].available() == (False, "AWS_REGION (or CODEMIND_BEDROCK_REGION) is not set")
    assert providers["azure"].available() == (False, "AZURE_OPENAI_ENDPOINT is not set")


def test_config_reads_the_environment():
    c = ProviderConfig.from_env({"AWS_REGION": "eu-west-1", "CODEMIND_BEDROCK_REGION": "us-west-2",
                                 "CODEMIND_LLM_TIMEOUT_S": "45", "OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": " k "})
    assert c.bedrock_region == "us-west-2" and c.timeout_s == 45
    assert c.openai_api_key is None and c.anthropic_api_key.get_secret_value() == "k"
    d = ProviderConfig.from_env({})
    assert d.timeout_s == 120 and d.azure_api_version == "2024-10-21" and d.bedrock_region is None
    assert ProviderConfig.from_env({"AWS_REGION": "eu-west-1"}).bedrock_region == "eu-west-1"
    available = {k: p.available()[0] for k, p in build_providers(ProviderConfig.from_env(SECRETS | {
        "AWS_REGION": "us-east-1", "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com"})).items()}
    assert available == dict.fromkeys(("anthropic", "bedrock", "openai", "azure", "offline"), True)


def test_clients_are_built_on_first_call_only(standin, plan_call):
    providers = providers_for(standin)
    assert not any(p._client.built for k, p in providers.items() if k != "offline")
    providers["azure"].complete(plan_call("azure"))
    assert providers["azure"]._client.built and not providers["openai"]._client.built


def test_secrets_stay_out_of_reprs_and_errors(standin, plan_call):
    config = standin.config(**SECRETS)
    providers = build_providers(config)
    shown = [repr(config), str(config), config.model_dump_json(), *(repr(p) for p in providers.values())]
    own = {"anthropic": ["ANTHROPIC_API_KEY"], "bedrock": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
           "openai": ["OPENAI_API_KEY"], "azure": ["AZURE_OPENAI_API_KEY"]}
    for family in ALL:
        # A server that echoes the credential back must not put it into our error text.
        echoed = " ".join(SECRETS[k] for k in own[family])
        standin.error(401, message=f"Incorrect API key provided: {echoed}")
        with pytest.raises(FatalError) as info:
            providers[family].complete(plan_call(family))
        shown += [str(info.value), repr(info.value)]
    for text in shown:
        for value in SECRETS.values():
            assert value not in text


# ---------------------------------------------------------------------------------------------------------
# The stand-in as a pipeline double


def test_offline_solver_answers_every_delivery_task_through_the_sdks(standin, intent):
    plan = plan_offline(PlanInput(intent=intent))
    providers = providers_for(standin)
    cases = [(PLAN_TASK, PlanInput(intent=intent), plan_offline, "anthropic"),
             (CODE_TASK, CodeInput(intent=intent, plan=plan), code_offline, "openai"),
             (CONTRACT_TASK, ContractInput(intent=intent), contract_offline, "bedrock")]
    for task, payload, offline, family in cases:
        out = providers[family].complete(make_call(task, payload, family)).output
        assert task.output.model_validate(out) == offline(payload)
    repair = offline_solver.task("repair")  # rendered without <field> blocks: only the intent is read back
    payload = repair.input(intent=intent, files={"service/app.py": "broken"}, failures=["test_x failed"], round=1)
    out = providers["azure"].complete(make_call(repair, payload, "azure")).output
    assert repair.output.model_validate(out) == repair.offline(payload)
    assert [task_name(r.json) for r in standin.requests] == ["planning", "coding", "test_writing", "repair"]
    assert "<plan>" in user_text(standin.requests[1].json)
    assert offline_solver.task("coding") is CODE_TASK


def test_the_stand_in_serves_concurrent_calls(plan_call):
    with StandIn() as s:
        providers = providers_for(s)
        calls = [(f, plan_call(f)) for f in ALL for _ in range(10)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda fc: providers[fc[0]].complete(fc[1]), calls))
    assert len(results) == len(s.requests) == 40
    assert all(r.output["routes"] for r in results)


def test_stop_releases_hung_requests_and_the_port(plan_call):
    import socket

    s = StandIn().start()
    port = s.port
    s.hang(60)
    with pytest.raises(TransientError):
        providers_for(s, timeout_s=0.2)["openai"].complete(plan_call("openai"))
    started = time.monotonic()
    s.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
