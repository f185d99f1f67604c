"""A team's own routing table, given as JSON: {"task": [["provider", "model", tier], ...]}."""

from __future__ import annotations

import json

from codemind_dagster.resources.llm.router import TASKS, Candidate


def parse_routes(text: str) -> dict[str, list[Candidate]]:
    """Parse CODEMIND_LLM_ROUTES; a mistake is a clear error, never a silently empty route."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"CODEMIND_LLM_ROUTES is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ValueError('CODEMIND_LLM_ROUTES must map tasks to candidates: {"planning": [["anthropic", ...]]}')
    routes = {}
    for task, cands in raw.items():
        if task not in TASKS:
            raise ValueError(f"CODEMIND_LLM_ROUTES names unknown task {task!r} (tasks: {', '.join(TASKS)})")
        if not isinstance(cands, list) or not cands:
            raise ValueError(f"CODEMIND_LLM_ROUTES[{task!r}] must be a non-empty list of [provider, model, tier]")
        parsed = []
        for c in cands:
            if (not isinstance(c, list) or len(c) != 3 or not all(isinstance(x, str) for x in c[:2])
                    or not isinstance(c[2], int) or isinstance(c[2], bool)):
                raise ValueError(f"CODEMIND_LLM_ROUTES[{task!r}]: {c!r} is not [provider, model, tier]")
            parsed.append(Candidate(c[0], c[1], c[2]))
        routes[task] = parsed
    return routes
