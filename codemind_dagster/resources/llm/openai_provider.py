"""GPT models through OpenAI or Azure OpenAI: Chat Completions with json_schema structured output."""

from __future__ import annotations

import json
from typing import Any

from pydantic import SecretStr

from codemind_dagster.resources.llm.anthropic_provider import (
    Redactor,
    SdkProvider,
    connection_error,
    dump_body,
    feedback_text,
    json_body,
    output_error,
    priced,
    secret,
    status_error,
    token_counts,
)
from codemind_dagster.resources.llm.errors import FatalError, ProviderUnavailable
from codemind_dagster.resources.llm.providers import Call, Completion
from codemind_dagster.resources.llm.usage import Usage

# The latest GA data-plane version with json_schema response formats and max_completion_tokens.
DEFAULT_AZURE_API_VERSION = "2024-10-21"


def chat_request(call: Call) -> dict[str, Any]:
    """System alone, then the user message: the stable context first so OpenAI's prefix cache can hit."""
    user: list[dict[str, Any]] = [{"type": "text", "text": t} for t in (call.context, call.prompt) if t]
    if call.feedback:
        user.append({"type": "text", "text": feedback_text(
            call.feedback, "Answer again with a corrected JSON object.")})
    messages: list[dict[str, Any]] = [{"role": "system", "content": call.system}] if call.system else []
    messages.append({"role": "user", "content": user})
    return {
        "model": call.model, "messages": messages,
        # max_tokens is deprecated and rejected by reasoning models.
        "max_completion_tokens": call.max_tokens,
        # Not strict: strict mode rejects ordinary pydantic schemas (optional fields, open objects).
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": call.task.name, "schema": call.output_schema,
                                            "strict": False}},
    }


def normalize_usage(u: Any) -> Usage | None:
    """OpenAI counts cached prompt tokens inside prompt_tokens and reasoning inside completion_tokens.

    None when a count cannot be read.
    """
    totals = token_counts(u, "prompt_tokens", "completion_tokens")
    if totals is None:
        return None
    prompt_details = token_counts(u.get("prompt_tokens_details") or {}, "cached_tokens", "cache_write_tokens")
    completion_details = token_counts(u.get("completion_tokens_details") or {}, "reasoning_tokens")
    if prompt_details is None or completion_details is None:
        return None
    (prompt, completion), (cached, written), (reasoning,) = totals, prompt_details, completion_details
    return Usage(input_tokens=max(0, prompt - cached - written), cache_write_tokens=written, cache_read_tokens=cached,
                 output_tokens=max(0, completion - reasoning), reasoning_tokens=reasoning)


def parse_chat(provider: str, call: Call, body: dict[str, Any]) -> Completion:
    """The JSON answer and normalized usage, from a Chat Completions response body."""
    usage = normalize_usage(body.get("usage"))
    choices = body.get("choices")
    if not choices:
        raise output_error(f"{provider}: the response has no choices", "", usage)
    choice = choices[0] if isinstance(choices, list) else None
    msg = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(msg, dict):
        raise output_error(f"{provider}: unexpected response shape: no message in the first choice",
                           dump_body(body), usage)
    if msg.get("refusal"):
        raise output_error(f"{provider}: the model refused: {msg['refusal']}", str(msg["refusal"]), usage)
    raw = msg.get("content") or ""
    if not isinstance(raw, str):
        raise output_error(f"{provider}: unexpected response shape: the message content is not text",
                           dump_body(body), usage)
    if choice.get("finish_reason") == "length":
        raise output_error(f"{provider}: the answer was cut off at max_tokens={call.max_tokens}", raw, usage)
    if choice.get("finish_reason") == "content_filter":
        raise output_error(f"{provider}: the answer was withheld by the content filter", raw, usage)
    try:
        output = json.loads(raw)
    except (ValueError, RecursionError):
        raise output_error(f"{provider}: the answer is not valid JSON", raw, usage) from None
    if not isinstance(output, dict):
        raise output_error(f"{provider}: the answer is not a JSON object", raw, usage)
    return Completion(output=output, usage=priced(provider, usage, body), raw=raw)


class _OpenAIFamily(SdkProvider):
    """One implementation for OpenAI and Azure OpenAI; subclasses build the client."""

    name = "openai"

    def complete(self, call: Call) -> Completion:
        self._ensure_configured()
        import openai

        try:
            client = self._client.get(self._build)
        except (ValueError, openai.OpenAIError) as exc:
            raise ProviderUnavailable(self.name, self._redactor()(f"cannot build the client: {exc}")) from None
        try:
            # The raw body, as for Claude: no SDK response models built for an answer read as JSON.
            response = client.chat.completions.with_raw_response.create(**chat_request(call))
        except openai.APIStatusError as exc:
            # The SDK unwraps {"error": {...}}: exc.body is the inner object.
            raise status_error(self.name, exc.status_code, exc.body, exc.response.headers,
                               self._redactor()) from None
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            raise connection_error(self.name, exc, self.timeout_s, self._redactor()) from None
        except openai.OpenAIError as exc:
            raise FatalError(self.name, self._redactor()(f"{type(exc).__name__}: {exc}")) from None
        return parse_chat(self.name, call, json_body(self.name, response.http_response.content))


class OpenAIProvider(_OpenAIFamily):
    """The OpenAI API (or a compatible endpoint at `base_url`, e.g. http://host/v1)."""

    name = "openai"

    def __init__(self, api_key: SecretStr | str | None = None, base_url: str | None = None, *,
                 timeout_s: float = 120.0, name: str = "openai"):
        super().__init__()
        self.api_key, self.base_url, self.timeout_s, self.name = secret(api_key), base_url, timeout_s, name

    def __repr__(self) -> str:
        return (f"OpenAIProvider(name={self.name!r}, base_url={self.base_url!r}, "
                f"api_key={'set' if self.api_key else None}, timeout_s={self.timeout_s})")

    def _missing(self) -> str | None:
        return None if self.api_key else "OPENAI_API_KEY is not set"

    def _endpoint(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def _redactor(self) -> Redactor:
        return Redactor(self.api_key)

    def _build(self) -> Any:
        import openai

        assert self.api_key is not None
        # The router owns retries: one complete() is one HTTP request.
        return openai.OpenAI(api_key=self.api_key.get_secret_value(), base_url=self.base_url, max_retries=0,
                             timeout=self.timeout_s)


class AzureOpenAIProvider(_OpenAIFamily):
    """Azure OpenAI: a call's `model` is the deployment name."""

    name = "azure"

    def __init__(self, api_key: SecretStr | str | None = None, endpoint: str | None = None, *,
                 api_version: str = DEFAULT_AZURE_API_VERSION, timeout_s: float = 120.0, name: str = "azure"):
        super().__init__()
        self.api_key, self.endpoint, self.api_version = secret(api_key), endpoint or None, api_version
        self.timeout_s, self.name = timeout_s, name

    def __repr__(self) -> str:
        return (f"AzureOpenAIProvider(name={self.name!r}, endpoint={self.endpoint!r}, "
                f"api_version={self.api_version!r}, api_key={'set' if self.api_key else None}, "
                f"timeout_s={self.timeout_s})")

    def _missing(self) -> str | None:
        absent = [n for n, v in (("AZURE_OPENAI_API_KEY", self.api_key),
                                 ("AZURE_OPENAI_ENDPOINT", self.endpoint)) if not v]
        return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not set" if absent else None

    def _endpoint(self) -> str:
        return f"{self.endpoint} (api-version {self.api_version})"

    def _redactor(self) -> Redactor:
        return Redactor(self.api_key)

    def _build(self) -> Any:
        import openai

        assert self.api_key is not None
        return openai.AzureOpenAI(api_key=self.api_key.get_secret_value(), azure_endpoint=self.endpoint,
                                  api_version=self.api_version, max_retries=0, timeout=self.timeout_s)
