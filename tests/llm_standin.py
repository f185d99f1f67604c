"""A scripted local stand-in for the Anthropic, Bedrock, OpenAI and Azure OpenAI HTTP APIs."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

Solver = Callable[[dict[str, Any]], dict[str, Any]]

ANTHROPIC, BEDROCK, OPENAI, AZURE = "anthropic", "bedrock", "openai", "azure"
_BEDROCK_PATH = re.compile(r"^/model/(?P<model>[^/]+)/invoke$")
_AZURE_PATH = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)/chat/completions$")
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                          403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                          413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                          503: "api_error", 529: "overloaded_error"}
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                       404: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error",
                       503: "server_error"}


def tokens(text: str) -> int:
    """The same 4-characters-a-token estimate as the router's budgets."""
    return max(1, (len(text) + 3) // 4) if text else 0


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in saw it; `headers` keys are lower case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    family: str  # anthropic, bedrock, openai or azure


# What the stand-in does with the next request; the queue is shared by all endpoints.
@dataclass(frozen=True)
class _Respond:
    body: Any
    status: int
    headers: dict[str, str]


@dataclass(frozen=True)
class _Answer:
    output: dict[str, Any]


@dataclass(frozen=True)
class _Error:
    status: int
    body: Any
    headers: dict[str, str]
    message: str
    type: str | None
    code: str | None


@dataclass(frozen=True)
class _Hang:
    seconds: float


@dataclass(frozen=True)
class _Malformed:
    text: str
    kind: str  # "content": valid wire JSON, invalid answer; "body": the HTTP body itself is not JSON


# ---------------------------------------------------------------------------------------------------------
# Reading requests of either family


def task_name(body: dict[str, Any]) -> str:
    """The task a request is for: the forced tool `submit_<task>` or the json_schema name `<task>`."""
    choice = body.get("tool_choice") or {}
    if choice.get("name"):
        return str(choice["name"]).removeprefix("submit_")
    if body.get("tools"):
        return str(body["tools"][0]["name"]).removeprefix("submit_")
    schema = ((body.get("response_format") or {}).get("json_schema") or {})
    if schema.get("name"):
        return str(schema["name"])
    raise ValueError("the request names no task (no tool_choice, tools or response_format.json_schema)")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]


def user_text(body: dict[str, Any]) -> str:
    """Every user text block of a request, joined: context, prompt and feedback."""
    return "\n".join(t for m in body.get("messages", []) if m.get("role") == "user" for t in _texts(m["content"]))


def output_schema(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("tools"):
        return body["tools"][0].get("input_schema") or {}
    return ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}


# ---------------------------------------------------------------------------------------------------------
# Solvers


def agent_tasks() -> dict[str, Any]:
    """Every Task defined at the top level of a codemind_dagster.agents module, by name."""
    import importlib
    import pkgutil

    from codemind_dagster import agents
    from codemind_dagster.domain.task import Task

    found: dict[str, Any] = {}
    for mod in pkgutil.iter_modules(agents.__path__):
        if mod.ispkg:
            continue
        module = importlib.import_module(f"{agents.__name__}.{mod.name}")
        found.update((v.name, v) for v in vars(module).values() if isinstance(v, Task))
    return found


class OfflineSolver:
    """Answers with the task's own offline solution, rebuilding its input from the request's text.

    Each field of the task's input model is read from a `<field>\n<json>\n</field>` block (the intent
    from the context block, the plan of the coding task from its prompt). Fields rendered otherwise
    (the repair task's files) are left out and the input is built unvalidated: offline solutions read
    only what they need. Answers are memoized by (task, text): a benchmark pays once per distinct request.
    """

    def __init__(self, tasks: list[Any] | None = None, *, memo_size: int = 256):
        self._tasks = {t.name: t for t in tasks or []}
        self._defaults_loaded = False
        self._memo: dict[str, dict[str, Any]] = {}
        self._memo_size = memo_size
        self._lock = threading.Lock()

    def register(self, *tasks: Any) -> OfflineSolver:
        for t in tasks:
            self._tasks[t.name] = t
        return self

    def task(self, name: str) -> Any:
        if not self._defaults_loaded:
            for t_name, t in agent_tasks().items():
                self._tasks.setdefault(t_name, t)
            self._defaults_loaded = True
        if name not in self._tasks:
            raise KeyError(f"no offline solution for task {name!r}; known: {sorted(self._tasks)}")
        return self._tasks[name]

    def payload(self, task: Any, text: str) -> Any:
        from pydantic import ValidationError

        fields = {}
        for f in task.input.model_fields:
            m = re.search(rf"<{re.escape(f)}>\n(.*?)\n</{re.escape(f)}>", text, re.DOTALL)
            if m:
                fields[f] = json.loads(m.group(1))
        try:
            return task.input.model_validate(fields)
        except ValidationError:
            return task.input.model_construct(**fields)

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        name, text = task_name(body), user_text(body)
        key = hashlib.sha256(f"{name}\0{text}".encode()).hexdigest()
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        task = self.task(name)
        answer = task.offline(self.payload(task, text)).model_dump(mode="json")
        with self._lock:
            if len(self._memo) >= self._memo_size:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = answer
        return answer


offline_solver = OfflineSolver()


def schema_example(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A minimal instance of a JSON schema (required properties only), for tasks with no offline solution."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return schema_example(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return schema_example(schema[key][0], defs)
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: schema_example(props[k], defs) for k in schema.get("required", []) if k in props}
    return {"array": [], "string": "x", "integer": 0, "number": 0, "boolean": False, "null": None}.get(kind)


def default_solver(body: dict[str, Any]) -> dict[str, Any]:
    """The offline solution for known tasks, else a minimal instance of the requested schema."""
    try:
        offline_solver.task(task_name(body))
    except KeyError:
        return schema_example(output_schema(body))
    return offline_solver(body)


# ---------------------------------------------------------------------------------------------------------
# The server


class StandIn:
    """An HTTP server on 127.0.0.1 answering the four LLM APIs, scripted by a queue of behaviours.

    With an empty queue every request is answered by `solver(request_json)`, wrapped in the family's
    wire format with simulated prompt caching: a request whose cached prefix was seen before reports
    cache reads instead of cache writes.
    """

    def __init__(self, solver: Solver | None = None, *, reasoning_tokens: int = 0, latency_s: float = 0.0):
        self.solver = solver or default_solver
        self.reasoning_tokens = reasoning_tokens  # added to every OpenAI-family completion
        self.latency_s = latency_s
        self.requests: list[Recorded] = []
        self._queue: deque[Any] = deque()
        self._prefixes: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> StandIn:
        stand_in = self
        self._stopping.clear()

        class Handler(_Handler):
            owner = stand_in

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.request_queue_size = 128  # a benchmark opens many connections at once
        server.server_bind()
        server.server_activate()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"llm-standin-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            # Idle keep-alive connections would otherwise hold their handler threads open.
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "the stand-in is not running"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for Anthropic, Bedrock and the Azure endpoint."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def env(self) -> dict[str, str]:
        """Environment variables pointing every provider here with dummy credentials."""
        return {
            "ANTHROPIC_API_KEY": "sk-ant-standin-key", "ANTHROPIC_BASE_URL": self.url,
            "OPENAI_API_KEY": "sk-standin-openai-key", "OPENAI_BASE_URL": self.openai_url,
            "AWS_ACCESS_KEY_ID": "AKIASTANDIN000000000", "AWS_SECRET_ACCESS_KEY": "standin-secret-access-key",
            "AWS_REGION": "us-east-1", "CODEMIND_BEDROCK_BASE_URL": self.url,
            "AZURE_OPENAI_API_KEY": "standin-azure-key", "AZURE_OPENAI_ENDPOINT": self.url,
        }

    def config(self, **overrides: Any) -> Any:
        """A ProviderConfig pointing every provider here (see `env`)."""
        from codemind_dagster.resources.llm.config import ProviderConfig

        return ProviderConfig.from_env({**self.env(), **{k: str(v) for k, v in overrides.items()}})

    # -- script ------------------------------------------------------------------------------------------

    def respond(self, json_body: Any, status: int = 200, headers: dict[str, str] | None = None) -> StandIn:
        """Send this exact body (a wire-format response, or any JSON) to the next request."""
        self._queue.append(_Respond(json_body, status, dict(headers or {})))
        return self

    def answer(self, output: dict[str, Any]) -> StandIn:
        """Answer the next request with this output, in its family's wire format with simulated usage."""
        self._queue.append(_Answer(output))
        return self

    def error(self, status: int, body: Any = None, headers: dict[str, str] | None = None, *,
              message: str = "stand-in error", type: str | None = None, code: str | None = None) -> StandIn:
        """Fail the next request; without `body`, an error body in the family's format is built."""
        self._queue.append(_Error(status, body, dict(headers or {}), message, type, code))
        return self

    def hang(self, seconds: float) -> StandIn:
        """Hold the next request this long (or until stop) before answering, to trip client timeouts."""
        self._queue.append(_Hang(seconds))
        return self

    def malformed(self, text: str = "Sure! Here is the plan: {not json", *, kind: str = "content") -> StandIn:
        """kind="content": a well-formed response whose answer is this text (no tool call / not JSON);
        kind="body": a 200 whose HTTP body is this text."""
        if kind not in ("content", "body"):
            raise ValueError("kind is 'content' or 'body'")
        self._queue.append(_Malformed(text, kind))
        return self

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queue.clear()
            self._prefixes.clear()

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    # -- wire formats -----------------------------------------------------------------------------------

    def _cache_usage(self, segments: list[tuple[str, bool]]) -> tuple[int, int, int]:
        """(uncached input, cache write, cache read) for text segments flagged as cache breakpoints."""
        total = sum(tokens(t) for t, _ in segments)
        digest, upto, breakpoints = hashlib.sha256(), 0, []
        for text, is_breakpoint in segments:
            digest.update(text.encode() + b"\0")
            upto += tokens(text)
            if is_breakpoint:
                breakpoints.append((digest.copy().hexdigest(), upto))
        if not breakpoints:
            return total, 0, 0
        with self._lock:
            read = max((n for key, n in breakpoints if key in self._prefixes), default=0)
            self._prefixes.update(key for key, _ in breakpoints)
        cached = breakpoints[-1][1]
        return total - cached, cached - read, read

    def _anthropic_message(self, body: dict[str, Any], content: list[dict[str, Any]], stop: str,
                           model: str) -> dict[str, Any]:
        segments = [(json.dumps(body.get("tools", []), sort_keys=True), False)]
        system = body.get("system") or []
        for b in [{"text": system}] if isinstance(system, str) else system:
            segments.append((b.get("text", ""), "cache_control" in b))
        for m in body.get("messages", []):
            blocks = [{"text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            segments.extend((json.dumps(b, sort_keys=True) if "text" not in b else b["text"], "cache_control" in b)
                            for b in blocks)
        uncached, write, read = self._cache_usage(segments)
        out = sum(tokens(json.dumps(b.get("input", b.get("text", "")))) for b in content)
        return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": uncached, "cache_creation_input_tokens": write,
                          "cache_read_input_tokens": read, "output_tokens": out}}

    def _openai_completion(self, body: dict[str, Any], content: str, model: str) -> dict[str, Any]:
        # OpenAI caches prefixes automatically: the system message and the first user block (the context).
        segments = []
        for m in body.get("messages", []):
            texts = _texts(m.get("content"))
            segments.extend((t, m.get("role") == "user" and i == 0) for i, t in enumerate(texts))
        uncached, write, read = self._cache_usage(segments)
        prompt = uncached + write + read
        completion = tokens(content) + self.reasoning_tokens
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": content, "refusal": None}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion,
                          "prompt_tokens_details": {"cached_tokens": read, "audio_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens,
                                                        "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                                        "rejected_prediction_tokens": 0}}}

    def _success(self, family: str, body: dict[str, Any], model: str, output: dict[str, Any] | None,
                 text: str | None = None) -> dict[str, Any]:
        if family in (ANTHROPIC, BEDROCK):
            if output is not None:
                tool = (body.get("tool_choice") or {}).get("name") or body["tools"][0]["name"]
                content = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool,
                            "input": output}]
                return self._anthropic_message(body, content, "tool_use", model)
            return self._anthropic_message(body, [{"type": "text", "text": text or ""}], "end_turn", model)
        content = json.dumps(output) if output is not None else (text or "")
        return self._openai_completion(body, content, model)

    @staticmethod
    def _error_body(family: str, e: _Error) -> Any:
        if e.body is not None:
            return e.body
        if family == ANTHROPIC:
            return {"type": "error", "error": {"type": e.type or _ANTHROPIC_ERROR_TYPES.get(e.status, "api_error"),
                                               "message": e.message}}
        if family == BEDROCK:
            return {"message": e.message}
        return {"error": {"message": e.message, "type": e.type or _OPENAI_ERROR_TYPES.get(e.status, "error"),
                          "param": None, "code": e.code}}

    def _handle(self, method: str, raw_path: str, headers: dict[str, str], raw: bytes
                ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        if path == "/v1/messages":
            family, model = ANTHROPIC, (body or {}).get("model", "")
        elif m := _BEDROCK_PATH.match(path):
            family, model = BEDROCK, m.group("model")
        elif path == "/v1/chat/completions":
            family, model = OPENAI, (body or {}).get("model", "")
        elif m := _AZURE_PATH.match(path):
            family, model = AZURE, m.group("deployment")
        else:
            return 404, {}, json.dumps({"error": {"message": f"no route {method} {path}"}}).encode()
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body, family))
        if method != "POST" or not isinstance(body, dict):
            return 400, {}, json.dumps({"error": {"message": "expected a POST with a JSON object"}}).encode()
        if self.latency_s:
            self._stopping.wait(self.latency_s)
        behaviour = self._queue.popleft() if self._queue else None
        if isinstance(behaviour, _Hang):
            self._stopping.wait(behaviour.seconds)
            behaviour = None
        if isinstance(behaviour, _Respond):
            return behaviour.status, behaviour.headers, json.dumps(behaviour.body).encode()
        if isinstance(behaviour, _Error):
            return behaviour.status, behaviour.headers, json.dumps(self._error_body(family, behaviour)).encode()
        if isinstance(behaviour, _Malformed):
            if behaviour.kind == "body":
                return 200, {}, behaviour.text.encode()
            return 200, {}, json.dumps(self._success(family, body, model, None, behaviour.text)).encode()
        output = behaviour.output if isinstance(behaviour, _Answer) else self.solver(body)
        return 200, {}, json.dumps(self._success(family, body, model, output)).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: StandIn
    protocol_version = "HTTP/1.1"  # keep-alive: the SDKs reuse connections, as they do in production
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._sockets.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            status, extra, payload = self.owner._handle(self.command, self.path, headers, raw)
        except Exception as exc:  # noqa: BLE001 - a solver bug must reach the test as a readable 500
            status, extra = 500, {}
            payload = json.dumps({"error": {"type": "standin_error", "message": f"{type(exc).__name__}: {exc}"}}
                                 ).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True  # the client gave up (timeout) or the stand-in is stopping

    do_POST = do_GET = _serve
