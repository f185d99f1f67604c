"""The business intent format (spec v1): parsing, validation and canonical hashing."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
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
# Control characters (other than tab/newline; C0, DEL and C1 such as the 8-bit CSI \x9b) have no
# business in an intent and hide payloads (ANSI escapes). Patterns are applied with fullmatch().
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
LINE_BREAKS = ("\n", "\r", "\x85", "\u2028", "\u2029")
INT64 = 2**63 - 1  # integers in an intent (minimum, maximum, default) must fit a 64-bit column
RESERVED_PLURALS = {"healthz", "docs", "openapi_json", "redoc"}


class IntentError(ValueError):
    """An intent file that breaks the spec; names the file, the YAML path and what was expected."""

    def __init__(self, file: str, path: str, expected: str):
        self.file, self.path, self.expected = file, path, expected
        super().__init__(f"{file}: {path}: {expected}" if path else f"{file}: {expected}")


def _text(value: Any, where: str, *, multiline: bool = False) -> None:
    """Rejects control characters anywhere and line breaks in one-line text; `where` is a YAML path."""
    if not isinstance(value, str):
        return
    m = CONTROL_RE.search(value)
    if m:
        raise ValueError(f"{where}: contains the control character {m.group()!r} at offset {m.start()} "
                         "(ANSI escapes and other control characters are not allowed)")
    if not multiline and any(b in value for b in LINE_BREAKS):
        hint = " (put longer text in spec.description)" if where == "summary" else ""
        raise ValueError(f"{where}: must be a single line{hint}")


Strict = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


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


# Keys that only make sense for some field types.
_TYPE_ONLY = {
    "format": ("string",), "enum": ("string",), "min_length": ("string", "text"),
    "max_length": ("string", "text"), "minimum": ("integer", "number"),
    "maximum": ("integer", "number"), "to": ("ref",), "on_delete": ("ref",),
}


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

    @model_validator(mode="before")
    @classmethod
    def _keys_for_type(cls, data: Any) -> Any:
        # Before the values are checked, so `enum: [1, 2]` on an integer names the real mistake
        # (enum on an integer) rather than "enum[0]: expected a string".
        t = data.get("type") if isinstance(data, dict) else None
        if isinstance(t, str) and t in FIELD_TYPES:
            for key, types in _TYPE_ONLY.items():
                if data.get(key) is not None and t not in types:
                    raise ValueError(f"{key}: {key!r} is only allowed for type {' or '.join(types)}, not {t}")
        return data

    @model_validator(mode="after")
    def _rules(self) -> FieldSpec:
        if not FIELD_RE.fullmatch(self.name):
            raise ValueError(f"name: field name {self.name!r} must be snake_case matching {FIELD_RE.pattern}")
        if self.name == "id":
            raise ValueError("name: field name 'id' is reserved: every object has an implicit integer id")
        t = self.type
        for key, types in _TYPE_ONLY.items():
            if getattr(self, key) is not None and t not in types:
                raise ValueError(f"{key}: {key!r} is only allowed for type {' or '.join(types)}, not {t}")
        for key in ("minimum", "maximum", "default"):
            v = getattr(self, key)
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64:
                raise ValueError(f"{key}: {key} must be between -{INT64} and {INT64} (64-bit)")
        for key in ("minimum", "maximum"):
            v = getattr(self, key)
            if isinstance(v, bool) or (t == "integer" and v is not None and not isinstance(v, int)):
                raise ValueError(f"{key}: {key} must be {'an integer' if t == 'integer' else 'a number'}")
        if t == "ref" and not self.to:
            raise ValueError("to: a field of type ref needs 'to': the name of an entity of this intent")
        if t == "ref" and self.default is not None:
            raise ValueError("default: a ref field cannot have a default")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length: min_length {self.min_length} must not exceed "
                             f"max_length {self.max_length}")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"minimum: minimum {self.minimum} must not exceed maximum {self.maximum}")
        if self.enum is not None:
            for i, v in enumerate(self.enum):
                _text(v, f"enum[{i}]")
                if v in self.enum[:i]:
                    raise ValueError(f"enum[{i}]: enum value {v!r} is listed twice; enum values must be unique")
                problem = check_value(self, v, ignore_enum=True)
                if problem:
                    raise ValueError(f"enum[{i}]: enum value {v!r} breaks the field's own constraints: {problem}")
        if self.default is not None:
            problem = check_value(self, self.default)
            if problem:
                raise ValueError(f"default: default {self.default!r} is not valid for this field: {problem}")
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
        if isinstance(v, float) and not math.isfinite(v):
            return "expected a finite number"
    elif t == "boolean" and not isinstance(v, bool):
        return "expected a boolean"
    if t in ("string", "text"):
        if f.min_length is not None and len(v) < f.min_length:
            return f"shorter than min_length {f.min_length}"
        if f.max_length is not None and len(v) > f.max_length:
            return f"longer than max_length {f.max_length}"
        if f.format == "email" and not EMAIL_RE.fullmatch(v):
            return "not an email address"
        if f.format == "uri" and not URI_RE.fullmatch(v):
            return "not a URI"
        if f.format == "uuid" and not UUID_RE.fullmatch(v):
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


RFC3339_RE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def parse_rfc3339(v: str) -> datetime | None:
    if not isinstance(v, str) or not RFC3339_RE.fullmatch(v):
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
        if not ENTITY_RE.fullmatch(self.name):
            raise ValueError(f"name: entity name {self.name!r} must be PascalCase matching {ENTITY_RE.pattern}")
        if self.plural is not None and not PLURAL_RE.fullmatch(self.plural):
            raise ValueError(f"plural: plural {self.plural!r} must be snake_case matching {PLURAL_RE.pattern}")
        if self.collection in RESERVED_PLURALS:
            raise ValueError(f"{'plural' if self.plural else 'name'}: collection path /{self.collection} "
                             "is reserved by the service; set another plural")
        names = [f.name for f in self.fields]
        for j, n in enumerate(names):
            if n in names[:j]:
                raise ValueError(f"fields[{j}].name: field name {n!r} is used more than once in entity "
                                 f"{self.name} (first at fields[{names.index(n)}])")
        for j, op in enumerate(self.operations):
            if op in self.operations[:j]:
                raise ValueError(f"operations[{j}]: operation {op!r} is listed twice; operations must not repeat")
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
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"name: name {self.name!r} must be a DNS-1123 label matching {NAME_RE.pattern} "
                             "(lowercase letters, digits and '-', at most 40 characters)")
        _text(self.owner, "owner")
        return self


class Slo(BaseModel):
    model_config = Strict

    availability: Annotated[float, Field(gt=0, le=100)] | None = None
    p95_latency_ms: Annotated[int, Field(gt=0, le=600_000)] | None = None

    @model_validator(mode="after")
    def _rules(self) -> Slo:
        # 0.999 meant as a fraction would be a 0.999% objective that any service meets: say so instead.
        if self.availability is not None and self.availability <= 1:
            raise ValueError(f"availability: availability is a percentage, e.g. 99.9 for 99.9%; {self.availability:g} "
                             f"would mean {self.availability:g}% (write {self.availability * 100:g} if you meant "
                             "a fraction)")
        return self


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
            raise ValueError(f"environments: environments {envs} must be distinct and in the order "
                             "dev, staging, production")
        for i, e in enumerate(self.require_approval):
            if e not in envs:
                raise ValueError(f"require_approval[{i}]: require_approval names {e!r}, which is not in "
                                 f"environments {envs}")
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
        if not self.summary.strip():
            raise ValueError("summary: must not be blank")
        _text(self.description, "description", multiline=True)
        for i, rule in enumerate(self.rules):
            _text(rule, f"rules[{i}]", multiline=True)
        names = [e.name for e in self.entities]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"entities[{i}].name: entity name {n!r} is used more than once "
                                 f"(first at entities[{names.index(n)}])")
        paths = [e.collection for e in self.entities]
        for i, p in enumerate(paths):
            if p in paths[:i]:
                raise ValueError(f"entities[{i}].{'plural' if self.entities[i].plural else 'name'}: "
                                 f"entities {self.entities[paths.index(p)].name} and {self.entities[i].name} "
                                 f"share the collection path /{p}")
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
    """Safe YAML without anchors/aliases (alias bombs), merge keys, duplicate keys or implicit timestamps."""

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

    def construct_object(self, node, deep=False):  # type: ignore[override]
        # SafeLoader's scalar constructors raise plain ValueError/KeyError/AttributeError on hostile
        # input (`!!int abc`, `!!bool abc`, `!!timestamp abc`, a 5000-digit integer); report them
        # as YAML errors at the node instead of letting them escape as something else.
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            value = node.value if isinstance(node.value, str) else ""
            value = value if len(value) <= 40 else value[:40] + "..."
            tag = str(node.tag).rsplit(":", 1)[-1]
            why = str(e).split(";")[0][:120]
            raise yaml.MarkedYAMLError(
                None, None, f"{value!r} is not a valid !!{tag} value ({type(e).__name__}: {why})", node.start_mark
            ) from None

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!set [1]`: let PyYAML report it at its mark
            return super().construct_mapping(node, deep=deep)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.MarkedYAMLError(None, None, "merge keys (<<) are not allowed in an intent",
                                           key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans; quote it)" if isinstance(
                    key, bool) else ""
                raise yaml.MarkedYAMLError(None, None, f"mapping keys must be strings, got {_show(key)}{hint}",
                                           key_node.start_mark)
            if key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_IntentLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

# Which model a YAML mapping is, by its path with list indexes blanked: for "allowed keys" hints.
_MODELS: dict[str, type[BaseModel]] = {
    "": Intent, "metadata": Metadata, "spec": Spec, "spec.entities[]": EntitySpec,
    "spec.entities[].fields[]": FieldSpec, "spec.slo": Slo, "spec.budget": Budget, "spec.promotion": Promotion,
}
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SUBPATH_RE = re.compile(
    r"((?:[A-Za-z_][A-Za-z0-9_]*|\[\d+\])(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): (.*)", re.DOTALL
)
_TYPE_WORDS = {
    "string_type": "a string", "bool_type": "a boolean (true or false)", "int_type": "an integer",
    "float_type": "a number", "finite_number": "a finite number", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _yaml_path(loc: tuple[Any, ...]) -> str:
    """a.b[0].c; keys that are not plain identifiers are quoted and escaped (no raw control characters)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY_RE.fullmatch(str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{json.dumps(str(part)[:60])}]"
    return out


def _show(v: Any) -> str:
    """A short, escaped rendering of a hostile value (repr escapes control characters)."""
    try:
        r = repr(v)
    except ValueError:  # e.g. an integer over the 4300-digit str() limit
        return f"<{type(v).__name__} too large to show>"
    return r if len(r) <= 60 else r[:57] + "..."


def _kind(v: Any) -> str:
    kinds = {type(None): "nothing (null)", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "a list", dict: "a mapping"}
    return kinds.get(type(v), type(v).__name__)


def _real_loc(data: Any, loc: tuple[Any, ...], kind: str) -> tuple[Any, ...]:
    """The YAML path of a pydantic error location, without union member tags such as 'str' or 'int'."""
    out: list[Any] = []
    cur = data
    for i, part in enumerate(loc):
        in_list = isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur)
        if in_list or (isinstance(part, str) and isinstance(cur, dict) and part in cur):
            out.append(part)
            cur = cur[part]
        elif kind == "missing" and i == len(loc) - 1 and isinstance(cur, dict):
            out.append(part)
    return tuple(out)


def _friendly(err: dict[str, Any], same: list[dict[str, Any]], loc: tuple[Any, ...]) -> str:
    kind, msg = err["type"], err["msg"]
    inp = err.get("input")
    if kind == "extra_forbidden":
        shape = "".join("[]" if isinstance(p, int) else f".{p}" for p in loc[:-1]).lstrip(".")
        model = _MODELS.get(shape)
        if model is None:
            return "unknown key (not in spec v1)"
        allowed = [f.alias or n for n, f in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key (not in spec v1); {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected {msg.removeprefix('Input should be ')} (got {_show(inp)})"[:300]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    words = list(dict.fromkeys(_TYPE_WORDS[e["type"]] for e in same if e["type"] in _TYPE_WORDS))
    if words:
        expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
        hint = ""
        if isinstance(inp, bool) and "a string" in words:
            hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans; quote the value)"
        if kind == "finite_number":
            return f"expected {expected}, got {_show(inp)}"
        return f"expected {expected}, got {_kind(inp)} {_show(inp)}{hint}"
    return f"{msg} (got {_kind(inp)} {_show(inp)})" if inp is not None else msg


def parse_intent_text(text: str, file: str = "<intent>") -> Intent:
    """Parse and validate intent YAML text; raises IntentError."""
    try:
        docs = list(yaml.load_all(text, Loader=_IntentLoader))  # noqa: S506 - _IntentLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        started = ""
        if e.problem and e.context and e.context_mark and e.context_mark is not mark:
            started = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise IntentError(file, where, f"invalid YAML: {e.problem or e.context}{started}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. a raw ESC byte
        raise IntentError(file, "", f"invalid YAML: {str(e).splitlines()[0]} (at character offset "
                                    f"{e.position})") from None
    except yaml.YAMLError as e:
        raise IntentError(file, "", f"invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise IntentError(file, "", "invalid YAML: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - whatever the safe loader trips on, the file is refused cleanly
        raise IntentError(file, "", f"invalid YAML: {type(e).__name__}: {str(e)[:200]!r}") from None
    if not docs:
        raise IntentError(file, "", "the file is empty: expected one YAML document, a mapping with "
                                    "apiVersion, kind, metadata and spec")
    if len(docs) != 1:
        raise IntentError(file, "", f"expected exactly one YAML document, found {len(docs)} (separated by '---')")
    data = docs[0]
    if not isinstance(data, dict):
        raise IntentError(file, "", "expected a mapping with apiVersion, kind, metadata and spec at the top "
                                    f"level, got {_kind(data)}")
    if "api_version" in data:  # the model accepts its Python name too (populate_by_name); a file may not
        raise IntentError(file, "api_version", "unknown key (not in spec v1); did you mean 'apiVersion'?")
    try:
        return Intent.model_validate(data)
    except ValidationError as e:
        _raise(file, data, e.errors())
        raise  # unreachable: _raise always raises


def _raise(file: str, data: Any, errors: list[dict[str, Any]]) -> None:
    err = errors[0]
    loc = _real_loc(data, tuple(err["loc"]), err["type"])
    same = [x for x in errors if _real_loc(data, tuple(x["loc"]), x["type"]) == loc]
    msg = _friendly(err, same, loc)
    path = _yaml_path(loc)
    # Model-level rules name the offending key below the model ("name: ...", "entities[2].fields[0].to: ...").
    m = _SUBPATH_RE.fullmatch(msg) if err["type"] == "value_error" else None
    if m:
        sub, msg = m.group(1), m.group(2)
        path = path + sub if (sub.startswith("[") or not path) else f"{path}.{sub}"
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
        with p.open("rb") as fh:  # never read more than the limit, even if the file grows meanwhile
            raw = fh.read(MAX_FILE_BYTES + 1)
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
