"""A task: typed input, pydantic output, prompts for models and a deterministic offline answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

I = TypeVar("I", bound=BaseModel)
O = TypeVar("O", bound=BaseModel)


@dataclass(frozen=True)
class Task(Generic[I, O]):
    """What an agent asks the router for; providers answer with an instance of `output`."""

    name: str
    version: str
    input: type[I]
    output: type[O]
    system: str
    context: Callable[[I], str]  # the stable part (the intent): providers may cache it
    render: Callable[[I], str]  # the task's instruction and variable inputs
    offline: Callable[[I], O]
    max_tokens: int = 8192
    tier: int = 1


def intent_context(inp: BaseModel) -> str:
    """The intent as fenced data: identical for every task of an intent, so providers can cache it."""
    return f"<intent>\n{json.dumps(inp.intent, sort_keys=True)}\n</intent>"  # type: ignore[attr-defined]
