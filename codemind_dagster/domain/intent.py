"""The business intent format (spec v1): parsing, validation and canonical hashing."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

MAX_FILE_BYTES = 256 * 1024
API_VERSION = "codemind.dev/v1"
ENVIRONMENTS = ("dev", "staging", "production")
OPERATIONS = ("create", "read", "update", "delete", "list")
FIELD_TYPES = ("string", "text", "integer", "number", "boolean", "datetime", "ref")

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
ENTITY_RE = re.compile(r"^[A-Z][A-Za-z0-9]{0,39}$")
FIELD_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
PLURAL_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Control characters (other than tab/newline) have no business in an intent and hide payloads.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
RESERVED_PLURALS = {"healthz", "docs", "openapi_json", "redoc"}


class IntentError(ValueError):
    """An intent file that breaks the spec; names the file, the YAML path and what was expected."""

    def __init__(self, file: str, path: str, expected: str):
        self.file, self.path, self.expected = file, path, expected
        super().__init__(f"{file}: {path}: {expected}" if path else f"{file}: {expected}")


def _text(value: Any, where: str, *, multiline: bool = False) -> None:
    if isinstance(value, str) and CONTROL_RE.search(value):
        raise ValueError(f"{where} contains control characters")
    if isinstance(value, str) and not multiline and ("\n" in value or "\r" in value):
        raise ValueError(f"{where} must be a single line")


Strict = ConfigDict(extra="forbid", strict=True, frozen=True)


def snake_case(name: str) -> str:
    """PascalCase to snake_case, keeping acronyms together (HTTPRequest -> http_request)."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def pluralize(word: str) -> str:
    """English plural of the last word, by the rules of spec section 2."""
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def default_plural(entity_name: str) -> str:
    return pluralize(snake_case(entity_name))


class FieldSpec(BaseModel):
    model_config = Strict

    name: StrictStr
    type: Literal["string", "text", "integer", "number", "boolean", "datetime", "ref"]
    required: StrictBool = False
    unique: StrictBool = False
    format: Literal["email", "uri", "uuid"] | None = None
    min_length: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    enum: Annotated[list[StrictStr], Field(min_length=1, max_length=200)] | None = None
    default: StrictStr | StrictBool | int | float | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    to: StrictStr | None = None
    on_delete: Literal["restrict", "cascade"] | None = None

    @model_validator(mode="after")
    def _rules(self) -> FieldSpec:
        if not FIELD_RE.match(self.name):
            raise ValueError(f"field name {self.name!r} must be snake_case matching {FIELD_RE.pattern}")
        if self.name == "id":
            raise ValueError("field name 'id' is reserved: every object has an implicit integer id")
        t = self.type
        only = {
            "format": ("string",), "enum": ("string",), "min_length": ("string", "text"),
            "max_length": ("string", "text"), "minimum": ("integer", "number"),
            "maximum": ("integer", "number"), "to": ("ref",), "on_delete": ("ref",),
        }
        for key, types in only.items():
            if getattr(self, key) is not None and t not in types:
                raise ValueError(f"{key!r} is only allowed for type {' or '.join(types)}, not {t}")
        for key in ("minimum", "maximum"):
            v = getattr(self, key)
            if isinstance(v, bool) or (t == "integer" and v is not None and not isinstance(v, int)):
                raise ValueError(f"{key} must be {'an integer' if t == 'integer' else 'a number'}")
        if t == "ref" and not self.to:
            raise ValueError("a field of type ref needs 'to': the name of an entity of this intent")
        if t == "ref" and self.default is not None:
            raise ValueError("a ref field cannot have a default")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError("minimum must not exceed maximum")
        if self.enum is not None:
            if len(set(self.enum)) != len(self.enum):
                raise ValueError("enum values must be unique")
            for v in self.enum:
                _text(v, "enum value")
            bad = [v for v in self.enum if check_value(self, v, ignore_enum=True)]
            if bad:
                raise ValueError(f"enum value {bad[0]!r} breaks the field's own constraints")
        if self.default is not None:
            problem = check_value(self, self.default)
            if problem:
                raise ValueError(f"default {self.default!r} is not valid for this field: {problem}")
        return self

    @property
    def effective_on_delete(self) -> str:
        return self.on_delete or "restrict"


def check_value(f: FieldSpec, v: Any, *, ignore_enum: bool = False) -> str | None:
    """Why a wire value is invalid for a field, or None; the rules every service must enforce."""
    t = f.type
    if t in ("string", "text", "datetime"):
        if not isinstance(v, str):
            return "expected a string"
    elif t == "integer" or t == "ref":
        if isinstance(v, bool) or not isinstance(v, int):
            return "expected an integer"
    elif t == "number":
        if isinstance(v, bool) or not isinstance(v, int | float):
            return "expected a number"
    elif t == "boolean" and not isinstance(v, bool):
        return "expected a boolean"
    if t in ("string", "text"):
        if f.min_length is not None and len(v) < f.min_length:
            return f"shorter than min_length {f.min_length}"
        if f.max_length is not None and len(v) > f.max_length:
            return f"longer than max_length {f.max_length}"
        if f.format == "email" and not EMAIL_RE.match(v):
            return "not an email address"
        if f.format == "uri" and not URI_RE.match(v):
            return "not a URI"
        if f.format == "uuid" and not UUID_RE.match(v):
            return "not a UUID"
        if f.enum is not None and not ignore_enum and v not in f.enum:
            return f"not one of {f.enum}"
    if t in ("integer", "number"):
        if f.minimum is not None and v < f.minimum:
            return f"below minimum {f.minimum}"
        if f.maximum is not None and v > f.maximum:
            return f"above maximum {f.maximum}"
    if t == "datetime" and parse_rfc3339(v) is None:
        return "not an RFC 3339 date-time"
    return None


RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(v: str) -> datetime | None:
    if not RFC3339_RE.match(v):
        return None
    try:
        return datetime.fromisoformat(v.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None


class EntitySpec(BaseModel):
    model_config = Strict

    name: StrictStr
    plural: StrictStr | None = None
    fields: Annotated[list[FieldSpec], Field(min_length=1, max_length=50)]
    operations: Annotated[list[Literal["create", "read", "update", "delete", "list"]], Field(min_length=1)] = (
        Field(default_factory=lambda: list(OPERATIONS))
    )

    @model_validator(mode="after")
    def _rules(self) -> EntitySpec:
        if not ENTITY_RE.match(self.name):
            raise ValueError(f"entity name {self.name!r} must be PascalCase matching {ENTITY_RE.pattern}")
        if self.plural is not None and not PLURAL_RE.match(self.plural):
            raise ValueError(f"plural {self.plural!r} must be snake_case matching {PLURAL_RE.pattern}")
        if self.collection in RESERVED_PLURALS:
            raise ValueError(f"collection path /{self.collection} is reserved by the service")
        names = [f.name for f in self.fields]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"field name {dup!r} is used more than once in entity {self.name}")
        if len(set(self.operations)) != len(self.operations):
            raise ValueError("operations must not repeat")
        return self

    @property
    def collection(self) -> str:
        return self.plural or default_plural(self.name)


class Metadata(BaseModel):
    model_config = Strict

    name: StrictStr
    owner: Annotated[StrictStr, Field(min_length=1, max_length=100)] | None = None

    @model_validator(mode="after")
    def _rules(self) -> Metadata:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be a DNS-1123 label matching {NAME_RE.pattern}")
        _text(self.owner, "owner")
        return self


class Slo(BaseModel):
    model_config = Strict

    availability: Annotated[float, Field(gt=0, le=100)] | None = None
    p95_latency_ms: Annotated[int, Field(gt=0, le=600_000)] | None = None


class Budget(BaseModel):
    model_config = Strict

    llm_usd: Annotated[float, Field(ge=0, le=1_000_000)] | None = None


class Promotion(BaseModel):
    model_config = Strict

    environments: Annotated[list[Literal["dev", "staging", "production"]], Field(min_length=1)] = Field(
        default_factory=lambda: list(ENVIRONMENTS)
    )
    require_approval: list[Literal["dev", "staging", "production"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules(self) -> Promotion:
        envs = self.environments
        if len(set(envs)) != len(envs) or envs != sorted(envs, key=ENVIRONMENTS.index):
            raise ValueError("environments must be distinct and in the order dev, staging, production")
        missing = [e for e in self.require_approval if e not in envs]
        if missing:
            raise ValueError(f"require_approval names {missing[0]!r}, which is not in environments")
        return self


class Spec(BaseModel):
    model_config = Strict

    summary: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    description: Annotated[StrictStr, Field(max_length=20_000)] | None = None
    entities: Annotated[list[EntitySpec], Field(min_length=1, max_length=30)]
    rules: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=2_000)]], Field(max_length=100)] = (
        Field(default_factory=list)
    )
    slo: Slo | None = None
    budget: Budget | None = None
    promotion: Promotion = Field(default_factory=Promotion)

    @model_validator(mode="after")
    def _rules(self) -> Spec:
        _text(self.summary, "summary")
        _text(self.description, "description", multiline=True)
        for rule in self.rules:
            _text(rule, "rule", multiline=True)
        names = [e.name for e in self.entities]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"entity name {dup!r} is used more than once")
        paths = [e.collection for e in self.entities]
        dup = next((p for p in paths if paths.count(p) > 1), None)
        if dup:
            raise ValueError(f"two entities share the collection path /{dup}")
        for i, e in enumerate(self.entities):
            for j, f in enumerate(e.fields):
                if f.type == "ref" and f.to not in names:
                    raise ValueError(
                        f"entities[{i}].fields[{j}].to: {f.to!r} is not an entity of this intent "
                        f"(entities: {', '.join(names)})"
                    )
        return self


class Intent(BaseModel):
    """A validated business intent."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    api_version: Literal["codemind.dev/v1"] = Field(alias="apiVersion")
    kind: Literal["BusinessIntent"]
    metadata: Metadata
    spec: Spec

    @property
    def name(self) -> str:
        return self.metadata.name

    def entity(self, name: str) -> EntitySpec:
        return next(e for e in self.spec.entities if e.name == name)

    def canonical(self) -> dict[str, Any]:
        """The intent with defaults applied, as plain JSON data."""
        return self.model_dump(mode="json", by_alias=True)

    @property
    def content_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class _IntentLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases (alias bombs), duplicate keys or implicit timestamps."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, "anchors and aliases are not allowed in an intent", event.start_mark
            )
        if self.check_event(yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent):
            event = self.peek_event()
            if getattr(event, "anchor", None):
                raise yaml.MarkedYAMLError(
                    None, None, "anchors and aliases are not allowed in an intent", event.start_mark
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.MarkedYAMLError(None, None, f"mapping keys must be strings, got {key!r}",
                                           key_node.start_mark)
            if key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_IntentLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _friendly(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    inp = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (not in spec v1)"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected {msg.removeprefix('Input should be ')} (got {inp!r})"[:300]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg} (got {type(inp).__name__} {str(inp)[:60]!r})" if inp is not None else msg


def parse_intent_text(text: str, file: str = "<intent>") -> Intent:
    """Parse and validate intent YAML text; raises IntentError."""
    try:
        docs = list(yaml.load_all(text, Loader=_IntentLoader))  # noqa: S506 - _IntentLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise IntentError(file, where, f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise IntentError(file, "", f"invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise IntentError(file, "", "invalid YAML: nested too deeply") from None
    if len(docs) != 1:
        raise IntentError(file, "", f"expected exactly one YAML document, found {len(docs)}")
    data = docs[0]
    if not isinstance(data, dict):
        raise IntentError(file, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Intent.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        _raise(file, tuple(err["loc"]), err)
        raise  # unreachable: _raise always raises


def _raise(file: str, loc: tuple[Any, ...], err: dict[str, Any]) -> None:
    msg = _friendly(err)
    # A model-level rule may name a deeper path itself (dangling refs); keep the most precise one.
    m = re.match(r"^(entities\[\d+\]\.fields\[\d+\]\.to): (.*)$", msg)
    path = _yaml_path(loc)
    if m:
        path, msg = f"{path}.{m.group(1)}", m.group(2)
    raise IntentError(file, path or "(top level)", msg)


def read_intent_file(path: str | Path) -> Intent:
    """Read, size-check, decode and validate one intent file; raises IntentError."""
    p = Path(path)
    name = str(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise IntentError(name, "", "not a regular file")
        if size > MAX_FILE_BYTES:
            raise IntentError(name, "", f"file is {size} bytes; the limit is {MAX_FILE_BYTES} (256 KiB)")
        raw = p.read_bytes()[: MAX_FILE_BYTES + 1]
    except OSError as e:
        raise IntentError(name, "", f"cannot read file: {e.strerror}") from None
    return parse_intent_bytes(raw, name)


def parse_intent_bytes(raw: bytes, file: str = "<intent>") -> Intent:
    if len(raw) > MAX_FILE_BYTES:
        raise IntentError(file, "", f"file is over the limit of {MAX_FILE_BYTES} bytes (256 KiB)")
    if b"\x00" in raw:
        raise IntentError(file, "", "binary content (NUL bytes): an intent is UTF-8 YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IntentError(file, "", f"not UTF-8 text (invalid byte at offset {e.start})") from None
    return parse_intent_text(text, file)
