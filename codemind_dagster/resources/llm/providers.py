"""Providers answer a call with JSON output and usage; the offline one computes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from codemind_dagster.agents.task import Task
from codemind_dagster.resources.llm.usage import Usage, estimate_tokens


@dataclass(frozen=True)
class Call:
    """One request: the system prompt and context are stable (cacheable), the prompt varies."""

    task: Task
    payload: Any
    model: str
    system: str
    context: str
    prompt: str
    max_tokens: int
    output_schema: dict[str, Any]
    feedback: str | None = None  # why the previous answer was rejected, on the one re-ask


@dataclass(frozen=True)
class Completion:
    """The model's JSON answer (not yet validated against the schema) and normalized usage."""

    output: dict[str, Any]
    usage: Usage
    raw: str = ""


class Provider(Protocol):
    name: str

    def available(self) -> tuple[bool, str]: ...

    def complete(self, call: Call) -> Completion: ...


class OfflineProvider:
    """The deterministic provider of the local profile: runs each task's offline solution."""

    name = "offline"

    def available(self) -> tuple[bool, str]:
        return True, "built in; deterministic, no network"

    def complete(self, call: Call) -> Completion:
        output = call.task.offline(call.payload).model_dump(mode="json")
        usage = Usage(input_tokens=estimate_tokens(call.system + call.context + call.prompt),
                      output_tokens=estimate_tokens(json.dumps(output)))
        return Completion(output=output, usage=usage)
