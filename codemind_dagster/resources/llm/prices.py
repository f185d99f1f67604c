"""The versioned price table, kept as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from codemind_dagster.resources.llm.usage import Usage

PRICES_FILE = Path(__file__).with_name("prices.json")
PRICE_FIELDS = ("input", "cache_write", "cache_read", "output")


@dataclass(frozen=True)
class Price:
    input: float
    cache_write: float
    cache_read: float
    output: float

    def cost(self, usage: Usage) -> float:
        """USD for normalized usage; reasoning tokens are billed as output (they are reported apart)."""
        return (usage.input_tokens * self.input + usage.cache_write_tokens * self.cache_write
                + usage.cache_read_tokens * self.cache_read
                + (usage.output_tokens + usage.reasoning_tokens) * self.output) / 1_000_000

    def worst_case(self, input_tokens: int, max_tokens: int) -> float:
        """The most a call can cost: every input token at the dearer of input and cache write, plus `max_tokens`."""
        return (input_tokens * max(self.input, self.cache_write) + max_tokens * self.output) / 1_000_000

    def cache_savings(self, usage: Usage) -> float:
        """What prompt-cache reads saved against paying the full input price for them."""
        return usage.cache_read_tokens * max(0.0, self.input - self.cache_read) / 1_000_000


@dataclass(frozen=True)
class PriceTable:
    version: str
    models: dict[str, Price]
    date: str = ""
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # per model: date, source

    def price(self, provider: str, model: str) -> Price:
        key = f"{provider}/{model}"
        if key not in self.models:
            raise KeyError(f"no price for {key} in price table {self.version}: add it to {PRICES_FILE.name}")
        return self.models[key]

    def cost(self, provider: str, model: str, usage: Usage) -> float:
        return self.price(provider, model).cost(usage)


@cache
def load_prices(path: Path = PRICES_FILE) -> PriceTable:
    raw = json.loads(path.read_text())
    models = {k: Price(**{f: float(v[f]) for f in PRICE_FIELDS}) for k, v in raw["models"].items()}
    sources = {k: {"date": str(v.get("date", "")), "source": str(v.get("source", ""))}
               for k, v in raw["models"].items()}
    return PriceTable(version=raw["version"], models=models, date=str(raw.get("date", "")), sources=sources)
