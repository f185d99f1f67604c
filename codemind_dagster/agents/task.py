"""A task: typed input, pydantic output, prompts for models and a deterministic offline answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

I = TypeVar("I", bound=BaseModel)  # noqa: E741
O = TypeVar("O", bound=BaseModel)


@dataclass(frozen=True)
class Task(Generic[I, O]):
    """What an agent asks the router for; providers answer with an instance of `output`."""

    name: str
    version: str
    input: type[I]
    output: type[O]
    system: str
    render: Callable[[I], str]
    offline: Callable[[I], O]
    max_tokens: int = 8192
    tier: int = 1
