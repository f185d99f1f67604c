"""Similar-intent retrieval per intent: model load, embed, store, neighbour query, against planning without it.

Usage: .venv/bin/python benchmarks/embeddings.py [--intents N] [--database-url URL]

The baseline, measured in the same run on the same intents, is the planning step without retrieval: the
router's `planning` task on the deterministic offline provider (the local profile), a cache miss each time.
A model-backed planning call takes seconds on top of that, so these ratios are an upper bound.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
EXAMPLES = REPO / "examples" / "intents"


def intents(n: int) -> list:
    """`n` distinct intents of realistic length: the samples, each copy renamed and its summary varied."""
    from codemind_dagster.domain.intent import read_intent_file

    samples = [read_intent_file(p) for p in sorted(EXAMPLES.glob("*.yaml"))]
    out = []
    for i in range(n):
        data = samples[i % len(samples)].model_dump(by_alias=True, exclude_none=True)
        data["metadata"]["name"] = f"{data['metadata']['name'][:50]}-{i:04d}"
        data["spec"]["summary"] = f"{data['spec']['summary']} (site {i})"
        out.append(type(samples[0]).model_validate(data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=40, help="how many intents (default 40)")
    parser.add_argument("--database-url", help="platform DB (default: a temporary SQLite file)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="codemind-bench-emb-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    from codemind_dagster.agents.planning import PLAN_TASK, PlanInput
    from codemind_dagster.domain.similarity import render_neighbours
    from codemind_dagster.resources import embeddings
    from codemind_dagster.resources.database import PlatformDB
    from codemind_dagster.resources.llm.prices import load_prices
    from codemind_dagster.resources.llm.router import ModelRouter, routes_for
    from codemind_dagster.resources.llm.usage import estimate_tokens

    db = PlatformDB(args.database_url or f"sqlite:///{tmp / 'platform.db'}")
    db.migrate()
    router = ModelRouter(db=db, routing="offline")
    work = intents(args.intents)
    router.run(PLAN_TASK, PlanInput(intent=work[0].canonical()), intent="warmup", run_id="warmup")  # compiled SQL

    # Model load: what the first intent of a process pays, imports of numpy, tokenizers and safetensors included.
    t0 = time.perf_counter()
    embeddings.load_model()
    load_ms = (time.perf_counter() - t0) * 1000

    plan_ms, first, reused, added_tokens = [], [], [], []
    for i, intent in enumerate(work):
        t0 = time.perf_counter()
        router.run(PLAN_TASK, PlanInput(intent=intent.canonical()), intent=intent.name, run_id=f"bench-{i}")
        plan_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        r = embeddings.retrieve(db, intent, k=embeddings.NEIGHBOURS, min_similarity=embeddings.MIN_SIMILARITY)
        first.append({**r.timings_ms, "total": (time.perf_counter() - t0) * 1000})
        # The neighbours block goes into two prompts: planning and coding.
        added_tokens.append(2 * estimate_tokens(render_neighbours(r.neighbours)) if r.neighbours else 0)
    for intent in work:  # an unchanged intent run again: the stored vector and neighbours are read back
        t0 = time.perf_counter()
        r = embeddings.retrieve(db, intent, k=embeddings.NEIGHBOURS, min_similarity=embeddings.MIN_SIMILARITY)
        assert r.reused, intent.name
        reused.append((time.perf_counter() - t0) * 1000)

    base = statistics.median(plan_ms)

    def med(key: str) -> float:
        return statistics.median(f[key] for f in first)

    rows = [
        ("planning step without retrieval (baseline)", base),
        ("model load (once per process)", load_ms),
        ("embed one intent", med("embed")),
        ("store the vector", med("store")),
        (f"neighbour query (up to {len(work) - 1} stored)", med("query")),
        ("lookup of the stored vector", med("lookup")),
        ("retrieval, new intent (embed+store+query)", med("total")),
        ("retrieval, unchanged intent (reused)", statistics.median(reused)),
    ]
    tokens = statistics.median(added_tokens[1:] or [0])
    prices = load_prices()
    providers = routes_for("providers")

    def cheapest_input(task: str) -> float:
        return min(prices.models[f"{c.provider}/{c.model}"].input for c in providers[task])

    usd = tokens / 2 * (cheapest_input("planning") + cheapest_input("coding")) / 1_000_000
    print(f"\n{len(work)} intents on {db.engine.dialect.name}; {embeddings.model_id()}; medians per intent\n")
    print(f"{'measurement':<46} {'ms':>9} {'x baseline':>11}")
    for name, ms in rows:
        print(f"{name:<46} {ms:>9.2f} {ms / base:>11.2f}")
    print(f"{'prompt tokens added (planning + coding)':<46} {tokens:>9.0f}")
    print(f"{'their cost on the cheapest routed models, USD':<46} {usd:>9.6f}")
    print(f"RESULT load_ms={load_ms:.1f} embed_ms={med('embed'):.2f} store_ms={med('store'):.2f} "
          f"query_ms={med('query'):.2f} reused_ms={statistics.median(reused):.2f} plan_ms={base:.2f} "
          f"new_x_plan={med('total') / base:.2f} added_tokens={tokens:.0f} added_usd={usd:.6f}")


if __name__ == "__main__":
    main()
