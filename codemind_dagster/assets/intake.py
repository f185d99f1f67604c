"""Intake: a validated business intent per partition, and its business model as a graph."""

from typing import Any

import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.business_model import BusinessModel, build_business_model
from codemind_dagster.domain.intent import Intent
from codemind_dagster.resources.platform import DatabaseResource, GraphStoreResource, IntentStoreResource

OWNERS = ["team:platform"]


@dg.asset(partitions_def=intent_partitions, group_name="intake", kinds={"yaml", "pydantic"}, owners=OWNERS,
          description="A validated business intent (spec v1), one partition per intent.")
def business_intents(context: dg.AssetExecutionContext, intent_store: IntentStoreResource) -> Intent:
    intent = intent_store.store().load(context.partition_key)
    s = intent.spec
    context.add_output_metadata({
        "spec_hash": intent.content_hash,
        "summary": s.summary,
        "owner": intent.metadata.owner or "-",
        "entities": dg.MetadataValue.md("\n".join(f"- `{e.name}` at `/{e.collection}`: "
                                                  f"{len(e.fields)} fields, {', '.join(e.operations)}"
                                                  for e in s.entities)),
        "environments": ", ".join(s.promotion.environments),
        "llm_budget_usd": s.budget.llm_usd if s.budget and s.budget.llm_usd is not None else "default",
    })
    return intent


@dg.asset(partitions_def=intent_partitions, group_name="intake", kinds={"graph"}, owners=OWNERS,
          description="Entities, fields and references as a graph in the graph store (SQL tables by default, "
                      "Neo4j when CODEMIND_NEO4J_URL is set), with the impact of changing each entity.")
def business_model(context: dg.AssetExecutionContext, business_intents: Intent,
                   graph_store: GraphStoreResource, database: DatabaseResource) -> BusinessModel:
    model = build_business_model(business_intents)
    store = graph_store.store()
    store.write(model)
    live = database.client().live_deployments()
    context.add_output_metadata({
        "nodes": len(model.nodes), "edges": len(model.edges),
        "relations": dg.MetadataValue.md("\n".join(
            f"- {e.src} -[{e.properties['field']}, {e.properties['on_delete']}]-> "
            f"{e.dst}" for e in model.edges) or "none"),
        "impact": dg.MetadataValue.md(impact_markdown(
            model, [(n.key, r) for n in model.nodes for r in store.impact(n.key)], set(live))),
    })
    return model


def impact_markdown(model: BusinessModel, rows: list[tuple[str, dict[str, Any]]],
                    live: set[tuple[str, str]]) -> str:
    """Which other intents define or reference this intent's entities, and where they are live, as a table."""
    rows = [(name, r) for name, r in rows if r["intent"] != model.intent]
    if not rows:
        return "No other intent defines or references these entities."
    lines = ["| entity | other intent | how | live in |", "|---|---|---|---|"]
    for name, r in rows:
        how = f"defines `{name}`" if r["relation"] == "defines" else f"`{r['entity']}.{r['field']}` references it"
        envs = ", ".join(sorted(env for (intent, env) in live if intent == r["intent"])) or "-"
        lines.append(f"| `{name}` | {r['intent']} | {how} | {envs} |")
    return "\n".join(lines)
