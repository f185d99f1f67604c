"""The OpenAPI 3.1 document of a generated service, derived from the intent alone."""

from __future__ import annotations

import json
from typing import Any

from codemind_dagster.domain.intent import EntitySpec, FieldSpec, Intent

ERROR = {"$ref": "#/components/schemas/Error"}


def _field_schema(f: FieldSpec) -> dict[str, Any]:
    if f.type == "ref":
        return {"type": "integer", "minimum": 1, "description": f"id of a {f.to}"}
    if f.type == "datetime":
        return {"type": "string", "format": "date-time", "description": "RFC 3339"}
    schema: dict[str, Any] = {"type": "string" if f.type == "text" else f.type}
    rules = {"format": f.format, "minLength": f.min_length, "maxLength": f.max_length, "enum": f.enum,
             "minimum": f.minimum, "maximum": f.maximum, "default": f.default}
    schema.update({k: v for k, v in rules.items() if v is not None})
    return schema


def _nullable(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    return schema if required else {"anyOf": [schema, {"type": "null"}]}


def _schemas(e: EntitySpec) -> dict[str, Any]:
    fields = {f.name: _nullable(_field_schema(f), f.required) for f in e.fields}
    required = [f.name for f in e.fields if f.required and f.default is None]
    create: dict[str, Any] = {"type": "object", "properties": fields, "additionalProperties": False}
    if required:
        create["required"] = required
    stored = {"id": {"type": "integer"}, **{f.name: _nullable(_field_schema(f), False) for f in e.fields}}
    return {
        e.name: {"type": "object", "properties": stored, "required": list(stored)},
        f"{e.name}.Create": create,
        f"{e.name}.Update": {"type": "object", "properties": fields, "additionalProperties": False},
        f"{e.name}.Page": {
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": f"#/components/schemas/{e.name}"}},
                           "total": {"type": "integer"}},
            "required": ["items", "total"],
        },
    }


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _paths(e: EntitySpec) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{e.name}"}
    oid = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
    paging = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
    ]
    invalid, conflict, missing = _answer("invalid input", ERROR), _answer("conflict", ERROR), _answer(
        "not found", ERROR)
    ops: dict[str, tuple[str, str, dict[str, Any]]] = {
        "create": ("", "post", {
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{e.name}.Create"}}}},
            "responses": {"201": _answer("created", ref), "409": conflict, "422": invalid}}),
        "list": ("", "get", {"parameters": paging, "responses": {
            "200": _answer("a page in ascending id order", {"$ref": f"#/components/schemas/{e.name}.Page"}),
            "422": invalid}}),
        "read": ("/{id}", "get", {"parameters": oid, "responses": {"200": _answer("found", ref), "404": missing}}),
        "update": ("/{id}", "patch", {
            "parameters": oid,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": f"#/components/schemas/{e.name}.Update"}}}},
            "responses": {"200": _answer("updated", ref), "404": missing, "409": conflict, "422": invalid}}),
        "delete": ("/{id}", "delete", {"parameters": oid, "responses": {
            "204": _answer("deleted, with what cascades from it"), "404": missing,
            "409": _answer("still referenced (on_delete: restrict)", ERROR)}}),
    }
    paths: dict[str, Any] = {}
    for op in e.operations:
        suffix, method, spec = ops[op]
        paths.setdefault(f"/{e.collection}{suffix}", {})[method] = {
            "operationId": f"{op}_{e.collection}", "tags": [e.name], **spec}
    return paths


def render_openapi(intent: Intent) -> str:
    """The document as JSON text (sorted keys: byte-identical for the same intent)."""
    schemas: dict[str, Any] = {"Error": {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}}
    paths: dict[str, Any] = {"/healthz": {"get": {"operationId": "healthz", "responses": {
        "200": _answer("ready", {"type": "object", "properties": {"status": {"const": "ok"}}})}}}}
    for e in intent.spec.entities:
        schemas.update(_schemas(e))
        for path, methods in _paths(e).items():
            paths.setdefault(path, {}).update(methods)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": intent.name, "summary": intent.spec.summary, "version": intent.content_hash[:12]},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
