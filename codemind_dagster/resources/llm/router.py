"""The model router: the one door from agents to models, with cache, budgets and a ledger."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel

from codemind_dagster.agents.task import Task
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.llm.prices import PriceTable, load_prices
from codemind_dagster.resources.llm.providers import Call, OfflineProvider, Provider
from codemind_dagster.resources.llm.usage import Usage, estimate_tokens

O = TypeVar("O", bound=BaseModel)


class BudgetExceeded(RuntimeError):
    """A call that could exceed a budget was not made."""

    def __init__(self, budget: str, limit: float, spent: float, estimate: float):
        self.budget, self.limit, self.spent, self.estimate = budget, limit, spent, estimate
        super().__init__(f"{budget} budget of ${limit:.4f} would be exceeded: spent ${spent:.4f}, "
                         f"this call could cost up to ${estimate:.4f}; the call was not made")


class RouterError(RuntimeError):
    """No candidate could answer the task."""


@dataclass(frozen=True)
class Candidate:
    provider: str
    model: str
    tier: int = 1


OFFLINE_ROUTES: dict[str, list[Candidate]] = {
    task: [Candidate("offline", "deterministic", tier=9)]
    for task in ("intent_analysis", "planning", "coding", "test_writing", "repair")
}


@dataclass
class ModelRouter:
    db: PlatformDB
    providers: dict[str, Provider] = field(default_factory=lambda: {"offline": OfflineProvider()})
    routes: dict[str, list[Candidate]] = field(default_factory=lambda: dict(OFFLINE_ROUTES))
    prices: PriceTable = field(default_factory=load_prices)
    daily_budget_usd: float | None = None
    run_budget_usd: float | None = None

    def candidates(self, task: Task) -> list[Candidate]:
        """Cheapest first among the candidates that meet the task's quality tier."""
        eligible = [c for c in self.routes.get(task.name, []) if c.tier >= task.tier]
        return sorted(eligible, key=lambda c: self.prices.price(c.provider, c.model).output)

    def run(self, task: Task, payload: BaseModel, *, intent: str | None = None, run_id: str | None = None,
            intent_budget_usd: float | None = None) -> O:
        candidates = self.candidates(task)
        if not candidates:
            raise RouterError(f"no provider is routed for task {task.name!r} at tier {task.tier}")
        errors = []
        for cand in candidates:
            try:
                return self._run_candidate(task, payload, cand, intent, run_id, intent_budget_usd)
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - fail over to the next candidate, report all
                errors.append(f"{cand.provider}/{cand.model}: {exc}")
        raise RouterError(f"task {task.name!r} failed on every candidate: " + "; ".join(errors))

    def _run_candidate(self, task: Task, payload: BaseModel, cand: Candidate, intent: str | None,
                       run_id: str | None, intent_budget_usd: float | None):
        provider = self.providers[cand.provider]
        context, prompt = task.context(payload), task.render(payload)
        key = self.cache_key(task, cand, context + "\n" + prompt)
        base = {"run_id": run_id, "intent": intent, "task": task.name, "provider": cand.provider,
                "model": cand.model, "price_version": self.prices.version}
        cached = self.db.cache_get(key)
        if cached is not None:
            started = time.perf_counter()
            out = task.output.model_validate(cached)
            self.db.record_llm_call(**base, cost_usd=0, outcome="ok", cache_hit=True,
                                    latency_ms=(time.perf_counter() - started) * 1000)
            return out
        worst = Usage(input_tokens=estimate_tokens(task.system + context + prompt), output_tokens=task.max_tokens)
        self._check_budgets(self.prices.cost(cand.provider, cand.model, worst), intent, run_id, intent_budget_usd)
        started = time.perf_counter()
        call = Call(task=task, payload=payload, model=cand.model, system=task.system, context=context,
                    prompt=prompt, max_tokens=task.max_tokens, output_schema=task.output.model_json_schema())
        try:
            completion = provider.complete(call)
            out = task.output.model_validate(completion.output)
        except Exception as exc:
            self.db.record_llm_call(**base, cost_usd=0, outcome="error", cache_hit=False,
                                    latency_ms=(time.perf_counter() - started) * 1000, error=str(exc)[:2000])
            raise
        u = completion.usage
        self.db.record_llm_call(
            **base, input_tokens=u.input_tokens, cache_write_tokens=u.cache_write_tokens,
            cache_read_tokens=u.cache_read_tokens, output_tokens=u.output_tokens,
            reasoning_tokens=u.reasoning_tokens, cost_usd=self.prices.cost(cand.provider, cand.model, u),
            latency_ms=(time.perf_counter() - started) * 1000, outcome="ok", cache_hit=False)
        self.db.cache_put(key, task=task.name, provider=cand.provider, model=cand.model,
                          response=out.model_dump(mode="json"))
        return out

    def _check_budgets(self, estimate: float, intent: str | None, run_id: str | None,
                       intent_budget_usd: float | None) -> None:
        scopes = []
        if intent is not None and intent_budget_usd is not None:
            scopes.append((f"intent {intent!r}", intent_budget_usd, lambda: self.db.llm_spend(intent=intent)))
        if self.daily_budget_usd is not None:
            day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            scopes.append(("daily", self.daily_budget_usd, lambda: self.db.llm_spend(since=day)))
        if run_id is not None and self.run_budget_usd is not None:
            scopes.append((f"run {run_id[:8]}", self.run_budget_usd, lambda: self.db.llm_spend(run_id=run_id)))
        for name, limit, spent_so_far in scopes:
            spent = spent_so_far()
            # A spent budget stops every priced call, however small; free (offline) calls stay allowed.
            if spent + estimate > limit or (estimate > 0 and spent >= limit):
                raise BudgetExceeded(name, limit, spent, estimate)

    @staticmethod
    def cache_key(task: Task, cand: Candidate, prompt: str) -> str:
        blob = json.dumps({"provider": cand.provider, "model": cand.model, "task": task.name,
                           "schema": task.version, "max_tokens": task.max_tokens, "system": task.system,
                           "prompt": prompt}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
