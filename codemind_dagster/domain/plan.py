"""The implementation plan the planning agent produces and the code agent follows."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Route(BaseModel):
    method: str
    path: str
    operation: str
    entity: str


class EntityPlan(BaseModel):
    entity: str
    collection: str
    operations: list[str]
    references: list[str] = Field(default_factory=list)
    unique_fields: list[str] = Field(default_factory=list)


class ImplementationPlan(BaseModel):
    """Routes, storage and files of the service, plus what the provider will not implement."""

    intent: str
    entities: list[EntityPlan]
    routes: list[Route]
    files: list[str]
    storage: str
    rules_not_implemented: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
