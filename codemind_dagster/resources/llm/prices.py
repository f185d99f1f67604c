"""The versioned price table, kept as data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from codemind_dagster.resources.llm.usage import Usage

PRICES_FILE = Path(__file__).with_name("prices.json")


@dataclass(frozen=True)
class Price:
    input: float
    cache_write: float
    cache_read: float
    output: float


@dataclass(frozen=True)
class PriceTable:
    version: str
    models: dict[str, Price]

    def price(self, provider: str, model: str) -> Price:
        key = f"{provider}/{model}"
        if key not in self.models:
            raise KeyError(f"no price for {key} in price table {self.version}: add it to {PRICES_FILE.name}")
        return self.models[key]

    def cost(self, provider: str, model: str, usage: Usage) -> float:
        p = self.price(provider, model)
        return (usage.input_tokens * p.input + usage.cache_write_tokens * p.cache_write
                + usage.cache_read_tokens * p.cache_read
                + (usage.output_tokens + usage.reasoning_tokens) * p.output) / 1_000_000


@cache
def load_prices(path: Path = PRICES_FILE) -> PriceTable:
    raw = json.loads(path.read_text())
    models = {k: Price(**{f: float(v[f]) for f in ("input", "cache_write", "cache_read", "output")})
              for k, v in raw["models"].items()}
    return PriceTable(version=raw["version"], models=models)
