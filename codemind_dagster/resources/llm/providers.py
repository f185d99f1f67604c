"""Providers answer a call with JSON output and usage; the offline one computes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from codemind_dagster.domain.task import Task
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


class Completion:
    """The model's JSON answer (not yet validated against the schema) and normalized usage.

    `raw` is the answer's text; when the provider parsed it from a structure it is serialized on first use
    (large code answers are only ever re-read on an error path).
    """

    __slots__ = ("_raw", "output", "usage")

    def __init__(self, output: dict[str, Any], usage: Usage, raw: str | None = None):
        self.output, self.usage, self._raw = output, usage, raw

    @property
    def raw(self) -> str:
        if self._raw is None:
            self._raw = json.dumps(self.output)
        return self._raw

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Completion):
            return NotImplemented
        return (self.output, self.usage, self.raw) == (other.output, other.usage, other.raw)

    __hash__ = None  # type: ignore[assignment]  # mutable output: not hashable, like the dataclass it replaces

    def __repr__(self) -> str:
        return f"Completion(output={self.output!r}, usage={self.usage!r})"


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
