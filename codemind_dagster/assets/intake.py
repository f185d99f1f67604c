"""Intake: a validated business intent per partition, and its business model as a graph."""


import dagster as dg

from codemind_dagster.assets.partitions import intent_partitions
from codemind_dagster.domain.business_model import BusinessModel, build_business_model
from codemind_dagster.domain.intent import Intent
from codemind_dagster.resources.platform import GraphStoreResource, IntentStoreResource

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


@dg.asset(partitions_def=intent_partitions, group_name="intake", kinds={"sql"}, owners=OWNERS,
          description="Entities and their references as a graph in the graph store.")
def business_model(context: dg.AssetExecutionContext, business_intents: Intent,
                   graph_store: GraphStoreResource) -> BusinessModel:
    model = build_business_model(business_intents)
    graph_store.store().write(model)
    context.add_output_metadata({"nodes": len(model.nodes), "edges": len(model.edges),
                                 "relations": dg.MetadataValue.md("\n".join(
                                     f"- {e.src} -[{e.properties['field']}, {e.properties['on_delete']}]-> "
                                     f"{e.dst}" for e in model.edges) or "none")})
    return model
