"""Normalized token usage, the same shape for every provider."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


def estimate_tokens(text: str) -> int:
    """A conservative token estimate (about 4 characters a token) for budgets and offline usage."""
    return estimate_chars(len(text))


def estimate_chars(n: int) -> int:
    """`estimate_tokens` of a text of `n` characters."""
    return max(1, (n + 3) // 4)
