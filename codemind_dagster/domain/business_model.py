"""The business model: entities and their relations as a graph, derived from an intent."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from codemind_dagster.domain.intent import Intent


class Node(BaseModel):
    key: str
    kind: str
    properties: dict[str, Any]


class Edge(BaseModel):
    src: str
    dst: str
    kind: str
    properties: dict[str, Any]


class BusinessModel(BaseModel):
    """Entities as nodes, references as edges."""

    intent: str
    nodes: list[Node]
    edges: list[Edge]
    version: str | None = None  # the intent's content hash; a store may keep it to tell graphs apart


def build_business_model(intent: Intent) -> BusinessModel:
    nodes, edges = [], []
    for e in intent.spec.entities:
        nodes.append(Node(key=e.name, kind="Entity", properties={
            "collection": e.collection,
            "operations": list(e.operations),
            "fields": [f.model_dump(mode="json", exclude_none=True) for f in e.fields],
        }))
        for f in e.fields:
            if f.type == "ref":
                edges.append(Edge(src=e.name, dst=str(f.to), kind="REFERENCES",
                                  properties={"field": f.name, "on_delete": f.effective_on_delete,
                                              "required": f.required}))
    return BusinessModel(intent=intent.name, nodes=nodes, edges=edges, version=intent.content_hash)
