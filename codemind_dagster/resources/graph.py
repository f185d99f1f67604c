"""The business-model graph store: an interface, and its SQL implementation (Neo4j fills it in k8s)."""

from __future__ import annotations

from typing import Any, Protocol

from codemind_dagster.domain.business_model import BusinessModel, Edge, Node
from codemind_dagster.resources.database import PlatformDB


class GraphStore(Protocol):
    def write(self, model: BusinessModel) -> None: ...

    def read(self, intent: str) -> BusinessModel | None: ...

    def impact(self, entity: str) -> list[dict[str, Any]]:
        """Rows of {intent, entity, relation, field}: who defines or references an entity of that name."""
        ...


def impact_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Impact rows in the one order every store returns: by intent, relation, entity, field."""
    return sorted(rows, key=lambda r: (r["intent"], r["relation"], r["entity"], r["field"] or ""))


class SqlGraphStore:
    """Nodes and edges as rows in the platform database."""

    def __init__(self, db: PlatformDB):
        self.db = db

    def write(self, model: BusinessModel) -> None:
        self.db.replace_graph(model.intent, [n.model_dump() for n in model.nodes],
                              [e.model_dump() for e in model.edges])

    def read(self, intent: str) -> BusinessModel | None:
        nodes, edges = self.db.graph(intent)
        if not nodes:
            return None
        return BusinessModel(
            intent=intent,
            nodes=[Node(key=n.key, kind=n.kind, properties=n.properties) for n in nodes],
            edges=[Edge(src=e.src, dst=e.dst, kind=e.kind, properties=e.properties) for e in edges],
        )

    def impact(self, entity: str) -> list[dict[str, Any]]:
        """Which intents define an entity of that name, and which of their entities reference it."""
        nodes, edges = self.db.graph_usage(entity)
        return impact_rows(
            [{"intent": n.intent, "entity": n.key, "relation": "defines", "field": None} for n in nodes]
            + [{"intent": e.intent, "entity": e.src, "relation": "references", "field": e.properties.get("field")}
               for e in edges])
