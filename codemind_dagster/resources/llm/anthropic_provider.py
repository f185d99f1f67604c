"""Claude through the Anthropic API or Amazon Bedrock: tool-use structured output with prompt caching."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from pydantic import SecretStr

from codemind_dagster.resources.llm.errors import (
    FatalError,
    OutputError,
    ProviderError,
    ProviderUnavailable,
    SpendLimitError,
    TransientError,
)
from codemind_dagster.resources.llm.providers import Call, Completion
from codemind_dagster.resources.llm.usage import Usage

CACHE = {"type": "ephemeral"}
# Out-of-credit answers arrive as 400 (Anthropic), 402, or 429 (OpenAI insufficient_quota): never retried.
SPEND_MARKERS = ("billing_error", "insufficient_quota", "credit balance", "exceeded your current quota",
                 "billing_hard_limit", "reached your specified api usage limits")
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|AKIA[A-Z0-9]{12,})")


# ---------------------------------------------------------------------------------------------------------
# Shared by every HTTP provider (the OpenAI module imports these).


def secret(value: SecretStr | str | None) -> SecretStr | None:
    if value is None or (isinstance(value, str) and not value):
        return None
    return value if isinstance(value, SecretStr) else SecretStr(value)


class Redactor:
    """Removes a provider's own secrets, and anything shaped like an API key, from text we pass on."""

    def __init__(self, *secrets: SecretStr | None):
        self._values = [v for v in (s.get_secret_value() for s in secrets if s is not None) if len(v) >= 4]

    def __call__(self, text: str) -> str:
        for v in self._values:
            text = text.replace(v, "***")
        return _KEY_LIKE.sub("***", text)


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The server's wait hint: `retry-after-ms` (preferred) or `retry-after` in seconds or as an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def error_detail(body: object) -> tuple[str | None, str | None, str]:
    """(type, code, message) from an error body of any family: {"error": {...}}, {...} or text."""
    if isinstance(body, Mapping):
        inner = body.get("error") if isinstance(body.get("error"), Mapping) else body
        message = inner.get("message") or body.get("message") or json.dumps(body)[:500]
        return inner.get("type"), inner.get("code"), str(message)
    return None, None, "" if body is None else str(body)[:500]


def status_error(provider: str, status: int, body: object, headers: Mapping[str, str] | None,
                 redact: Redactor, error_type: str | None = None) -> ProviderError:
    """The router's error for an HTTP error status; `error_type` overrides the body's (Bedrock's header)."""
    etype, code, message = error_detail(body)
    etype = error_type or etype
    label = ", ".join(str(x) for x in dict.fromkeys((etype, code)) if x)
    text = redact(f"{label}: {message}" if label else message)
    markers = f"{etype} {code} {message}".lower()
    if status == 402 or (400 <= status < 500 and any(m in markers for m in SPEND_MARKERS)):
        return SpendLimitError(provider, text, status=status)
    if status in (408, 409, 429) or status >= 500:
        return TransientError(provider, text, status=status, retry_after_s=retry_after_s(headers))
    return FatalError(provider, text, status=status)


def connection_error(provider: str, exc: BaseException, timeout_s: float, redact: Redactor) -> TransientError:
    cause = exc.__cause__ or exc.__context__
    if "Timeout" in type(exc).__name__:
        return TransientError(provider, f"no answer within the client timeout of {timeout_s:g}s")
    return TransientError(provider, redact(f"connection failed: {cause or exc}"))


def feedback_text(feedback: str, retry: str) -> str:
    return f"Your previous answer was rejected: {feedback.rstrip().rstrip('.')}. {retry}"


def output_error(message: str, raw: str, usage: Usage | None) -> OutputError:
    """An OutputError carrying the tokens the answer cost, so the router's ledger never under-counts."""
    err = OutputError(message, raw=raw)
    err.usage = usage  # type: ignore[attr-defined]
    return err


def json_body(provider: str, content: bytes) -> dict[str, Any]:
    """A 200's body as a JSON object, or an OutputError (a proxy's page, say, or not even UTF-8)."""
    try:
        body = json.loads(content, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise OutputError(f"{provider}: the response body is not JSON",
                          raw=content[:10_000].decode(errors="replace")) from None
    if not isinstance(body, dict):
        raise OutputError(f"{provider}: unexpected response shape: not a JSON object", raw=dump_body(body))
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dump_body(body: Any) -> str:
    """A response body as text for an error's `raw`, capped."""
    return json.dumps(body, default=str)[:10_000]


def token_counts(u: Any, *names: str) -> list[int] | None:
    """The named token counts of a usage object, or None when any is not a count (missing ones are 0).

    None sends the answer down the router's estimate path: a count we cannot read is never taken as 0.
    """
    if not isinstance(u, dict):
        return None
    counts = []
    for name in names:
        v = u.get(name)
        if v is None:
            v = 0
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 2**53 or v % 1:
            return None
        counts.append(int(v))
    return counts

def priced(provider: str, usage: Usage | None, body: Any) -> Usage:
    """An answer's usage; an answer whose cost cannot be read is not taken (the router prices it from estimates)."""
    if usage is None:
        raise OutputError(f"{provider}: unexpected response shape: no readable usage", raw=dump_body(body))
    return usage


class LazyClient:
    """The SDK client, built on first use (never at import or definition load), once per provider."""

    def __init__(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self, build: Any) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = build()
        return self._client

    @property
    def built(self) -> bool:
        return self._client is not None


# ---------------------------------------------------------------------------------------------------------


def tool_name(call: Call) -> str:
    return f"submit_{call.task.name}"


def messages_request(call: Call) -> dict[str, Any]:
    """The Messages API request: system and intent context are cache breakpoints, the tool is forced."""
    name = tool_name(call)
    user: list[dict[str, Any]] = []
    if call.context:
        user.append({"type": "text", "text": call.context, "cache_control": CACHE})
    if call.prompt:
        user.append({"type": "text", "text": call.prompt})
    if call.feedback:
        user.append({"type": "text", "text": feedback_text(
            call.feedback, "Call the tool again with a corrected answer.")})
    request: dict[str, Any] = {
        "model": call.model, "max_tokens": call.max_tokens,
        "messages": [{"role": "user", "content": user}],
        "tools": [{"name": name, "input_schema": call.output_schema,
                   "description": f"Submit the {call.task.name} result. Its input is the whole answer."}],
        "tool_choice": {"type": "tool", "name": name},
    }
    if call.system:  # the API rejects empty text blocks
        request["system"] = [{"type": "text", "text": call.system, "cache_control": CACHE}]
    return request


def parse_message(provider: str, call: Call, body: dict[str, Any]) -> Completion:
    """The forced tool's input and normalized usage, from a Messages API response body."""
    counts = token_counts(body.get("usage"), "input_tokens", "cache_creation_input_tokens",
                          "cache_read_input_tokens", "output_tokens")
    # Anthropic's input_tokens already excludes cache writes and reads.
    usage = Usage(input_tokens=counts[0], cache_write_tokens=counts[1], cache_read_tokens=counts[2],
                  output_tokens=counts[3]) if counts else None
    content = body.get("content")
    if not isinstance(content, list):
        why = "no content" if content is None else "content is not a list"
        raise output_error(f"{provider}: unexpected response shape: {why}", dump_body(body), usage)
    blocks = [b for b in content if isinstance(b, dict)]
    tools = [b for b in blocks if b.get("type") == "tool_use"]
    stop = body.get("stop_reason")
    if not tools:
        text = "".join(str(b.get("text") or "") for b in blocks if b.get("type") == "text")
        raise output_error(f"{provider}: the model answered without calling {tool_name(call)} "
                           f"(stop_reason {stop})", text, usage)
    if "input" not in tools[0]:
        raise output_error(f"{provider}: unexpected response shape: the tool_use block has no input",
                           dump_body(body), usage)
    answer = tools[0]["input"]
    if stop == "max_tokens":
        raise output_error(f"{provider}: the answer was cut off at max_tokens={call.max_tokens}",
                           json.dumps(answer), usage)
    if not isinstance(answer, dict):
        raise output_error(f"{provider}: the tool input is not a JSON object", json.dumps(answer), usage)
    return Completion(output=answer, usage=priced(provider, usage, body))


class SdkProvider:
    """What every SDK-backed provider shares: a lazy client, a configuration check, availability."""

    name: str
    timeout_s: float

    def __init__(self) -> None:
        self._client = LazyClient()

    def _missing(self) -> str | None:
        raise NotImplementedError

    def _build(self) -> Any:
        raise NotImplementedError

    def _redactor(self) -> Redactor:
        raise NotImplementedError

    def _endpoint(self) -> str:
        raise NotImplementedError

    def available(self) -> tuple[bool, str]:
        missing = self._missing()
        return (False, missing) if missing else (True, f"configured: {self._endpoint()}")

    def _ensure_configured(self) -> None:
        missing = self._missing()
        if missing:
            raise ProviderUnavailable(self.name, missing)


class _AnthropicFamily(SdkProvider):
    """One implementation for both endpoints; subclasses say how to build the client and what is missing."""

    name = "anthropic"

    def complete(self, call: Call) -> Completion:
        self._ensure_configured()
        import anthropic

        try:
            client = self._client.get(self._build)
        except ValueError as exc:
            raise ProviderUnavailable(self.name, self._redactor()(f"cannot build the client: {exc}")) from None
        try:
            # The raw body: the answer is read from its JSON, so the SDK's response models are not built for
            # nothing; requests, auth, signing, errors and timeouts stay the SDK's.
            response = client.messages.with_raw_response.create(**messages_request(call))
        except anthropic.APIStatusError as exc:
            etype = exc.response.headers.get("x-amzn-errortype", "").split(":")[0] or None
            raise status_error(self.name, exc.status_code, exc.body, exc.response.headers, self._redactor(),
                               etype) from None
        except anthropic.APIConnectionError as exc:  # includes APITimeoutError
            raise connection_error(self.name, exc, self.timeout_s, self._redactor()) from None
        except anthropic.AnthropicError as exc:
            raise FatalError(self.name, self._redactor()(f"{type(exc).__name__}: {exc}")) from None
        return parse_message(self.name, call, json_body(self.name, response.http_response.content))


class AnthropicProvider(_AnthropicFamily):
    """The Anthropic API (or a compatible endpoint at `base_url`)."""

    name = "anthropic"

    def __init__(self, api_key: SecretStr | str | None = None, base_url: str | None = None, *,
                 timeout_s: float = 120.0, name: str = "anthropic"):
        super().__init__()
        self.api_key, self.base_url, self.timeout_s, self.name = secret(api_key), base_url, timeout_s, name

    def __repr__(self) -> str:
        return (f"AnthropicProvider(name={self.name!r}, base_url={self.base_url!r}, "
                f"api_key={'set' if self.api_key else None}, timeout_s={self.timeout_s})")

    def _missing(self) -> str | None:
        return None if self.api_key else "ANTHROPIC_API_KEY is not set"

    def _endpoint(self) -> str:
        return self.base_url or "https://api.anthropic.com"

    def _redactor(self) -> Redactor:
        return Redactor(self.api_key)

    def _build(self) -> Any:
        import anthropic

        assert self.api_key is not None
        # The router owns retries: one complete() is one HTTP request.
        return anthropic.Anthropic(api_key=self.api_key.get_secret_value(), base_url=self.base_url,
                                   max_retries=0, timeout=self.timeout_s)


class BedrockAnthropicProvider(_AnthropicFamily):
    """Claude on Amazon Bedrock (InvokeModel), SigV4-signed with explicit keys or a Bedrock API key.

    The default AWS credential chain is deliberately not used: it can reach the instance metadata
    service, and an unconfigured provider must never touch the network.
    """

    name = "bedrock"

    def __init__(self, region: str | None = None, access_key_id: SecretStr | str | None = None,
                 secret_access_key: SecretStr | str | None = None, *,
                 session_token: SecretStr | str | None = None, bearer_token: SecretStr | str | None = None,
                 base_url: str | None = None, timeout_s: float = 120.0, name: str = "bedrock"):
        super().__init__()
        self.region, self.base_url, self.timeout_s, self.name = region or None, base_url, timeout_s, name
        self.access_key_id, self.secret_access_key = secret(access_key_id), secret(secret_access_key)
        self.session_token, self.bearer_token = secret(session_token), secret(bearer_token)

    def __repr__(self) -> str:
        creds = "bearer" if self.bearer_token else ("keys" if self.access_key_id else None)
        return (f"BedrockAnthropicProvider(name={self.name!r}, region={self.region!r}, "
                f"base_url={self.base_url!r}, credentials={creds}, timeout_s={self.timeout_s})")

    def _missing(self) -> str | None:
        if not self.bearer_token:
            absent = [n for n, v in (("AWS_ACCESS_KEY_ID", self.access_key_id),
                                     ("AWS_SECRET_ACCESS_KEY", self.secret_access_key)) if not v]
            if absent:
                return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not set"
        if not self.region:
            return "AWS_REGION (or CODEMIND_BEDROCK_REGION) is not set"
        return None

    def _endpoint(self) -> str:
        return self.base_url or f"https://bedrock-runtime.{self.region}.amazonaws.com"

    def _redactor(self) -> Redactor:
        return Redactor(self.access_key_id, self.secret_access_key, self.session_token, self.bearer_token)

    def _build(self) -> Any:
        import anthropic

        def reveal(s: SecretStr | None) -> str | None:
            return s.get_secret_value() if s else None

        if self.bearer_token:
            return anthropic.AnthropicBedrock(api_key=reveal(self.bearer_token), aws_region=self.region,
                                              base_url=self.base_url, max_retries=0, timeout=self.timeout_s)
        return anthropic.AnthropicBedrock(
            aws_region=self.region, aws_access_key=reveal(self.access_key_id),
            aws_secret_key=reveal(self.secret_access_key), aws_session_token=reveal(self.session_token),
            base_url=self.base_url, max_retries=0, timeout=self.timeout_s)
