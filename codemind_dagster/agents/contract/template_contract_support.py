"""Contract-test support: the intent model, valid and invalid wire values, and an HTTP helper."""

# Copied verbatim into a code bundle as contract_tests/contract_support.py, where only the bundle,
# pytest, fastapi/starlette/httpx and the standard library exist: it must not import codemind_dagster.
# The value rules below mirror codemind_dagster.domain.intent.check_value (spec v1, section 2);
# tests/test_contract_suite.py checks the two agree.

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

OPERATIONS = ("create", "read", "update", "delete", "list")
MISSING_ID = 987654321  # an id no test creates
MAX_LIST = 500

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
RFC3339_RE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    required: bool = False
    unique: bool = False
    format: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    enum: tuple[str, ...] | None = None
    default: Any = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    to: str | None = None
    on_delete: str | None = None

    @property
    def effective_on_delete(self) -> str:
        return self.on_delete or "restrict"


@dataclass(frozen=True)
class Entity:
    name: str
    collection: str
    fields: tuple[Field, ...]
    operations: tuple[str, ...]

    @property
    def path(self) -> str:
        return "/" + self.collection

    def has(self, op: str) -> bool:
        return op in self.operations

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


@dataclass(frozen=True)
class RefEdge:
    """A ref field `child.field` pointing at `parent`."""

    child: str
    field: str
    parent: str
    on_delete: str

    @property
    def label(self) -> str:
        return f"{self.child}.{self.field}"


class Model:
    """The entities of one intent, as the contract sees them."""

    def __init__(self, name: str, entities: list[Entity]):
        self.name = name
        self.entities = entities
        self._by_name = {e.name: e for e in entities}
        self._blockers = self._creation_blockers()

    @classmethod
    def load(cls, path: Path) -> Model:
        return cls.from_intent(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_intent(cls, data: dict[str, Any]) -> Model:
        entities = []
        for e in data["spec"]["entities"]:
            fields = []
            for f in e["fields"]:
                known = {k: v for k, v in f.items() if k in Field.__dataclass_fields__}
                if known.get("enum") is not None:
                    known["enum"] = tuple(known["enum"])
                for bound in ("minimum", "maximum"):
                    # NaN compares false with everything, so check_value treats it as no bound at all.
                    if isinstance(known.get(bound), float) and math.isnan(known[bound]):
                        known[bound] = None
                fields.append(Field(**known))
            ops = e.get("operations") or list(OPERATIONS)
            entities.append(Entity(e["name"], e.get("plural") or default_plural(e["name"]), tuple(fields), tuple(ops)))
        return cls(data["metadata"]["name"], entities)

    def entity(self, name: str) -> Entity:
        return self._by_name[name]

    def edges(self) -> list[RefEdge]:
        return [
            RefEdge(e.name, f.name, f.to, f.effective_on_delete)
            for e in self.entities for f in e.fields if f.type == "ref"
        ]

    def why_not_creatable(self, name: str) -> str | None:
        """Why no object of this entity can be created through the API, or None."""
        return self._blockers.get(name)

    def _creation_blockers(self) -> dict[str, str]:
        blockers: dict[str, str] = {}
        for e in self.entities:
            if not e.has("create"):
                blockers[e.name] = f"{e.name} has no create operation"
                continue
            for f in e.fields:
                if f.required and f.type != "ref" and valid_value(f, 0) is None:
                    blockers[e.name] = f"no value satisfies the constraints of required field {e.name}.{f.name}"
                    break
        # Grow the creatable set from entities without required refs; a cycle of required refs never joins.
        creatable: set[str] = set()
        changed = True
        while changed:
            changed = False
            for e in self.entities:
                if e.name in creatable or e.name in blockers:
                    continue
                if all(f.to in creatable for f in e.fields if f.required and f.type == "ref"):
                    creatable.add(e.name)
                    changed = True
        for e in self.entities:
            if e.name not in creatable and e.name not in blockers:
                f = next(f for f in e.fields if f.required and f.type == "ref" and f.to not in creatable)
                blockers[e.name] = self._ref_blocker(e, f, blockers)
        return blockers

    @staticmethod
    def _ref_blocker(e: Entity, f: Field, blockers: dict[str, str]) -> str:
        if f.to in blockers:
            return f"required ref {e.name}.{f.name} needs a {f.to}, and {blockers[f.to]}"
        return (f"required ref {e.name}.{f.name} needs a {f.to}, and no {f.to} can be created first "
                "(required refs form a cycle)")


def snake_case(name: str) -> str:
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def pluralize(word: str) -> str:
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def default_plural(entity_name: str) -> str:
    return pluralize(snake_case(entity_name))


# ------------------------------------------------------------------------------------------ the rules


def parse_rfc3339(v: str) -> datetime | None:
    if not isinstance(v, str) or not RFC3339_RE.fullmatch(v):
        return None
    try:
        # Exactly as the platform parses it (and what Pythons before 3.11 need).
        return datetime.fromisoformat(v.replace("z", "Z").replace("Z", "+00:00"))  # noqa: FURB162
    except ValueError:
        return None


def check_value(f: Field, v: Any, *, ignore_enum: bool = False) -> str | None:
    """Why a wire value is invalid for a field, or None (spec v1; same rules as the platform's)."""
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
            return f"not one of {list(f.enum)}"
    if t in ("integer", "number"):
        if f.minimum is not None and v < f.minimum:
            return f"below minimum {f.minimum}"
        if f.maximum is not None and v > f.maximum:
            return f"above maximum {f.maximum}"
    if t == "datetime" and parse_rfc3339(v) is None:
        return "not an RFC 3339 date-time"
    return None


# ------------------------------------------------------------------------------------- valid values


def _b36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return out


def _string_candidate(f: Field, i: int) -> str | None:
    """The i-th distinct string for a string/text field, honouring format and length limits."""
    lo, hi = f.min_length or 0, f.max_length if f.max_length is not None else math.inf
    key = _b36(i)
    if f.format == "uuid":
        return f"00000000-0000-4000-8000-{i:012x}" if i < 16**12 else None
    if f.format == "email":
        # Padding goes into the local part with "_", which no key contains, so values stay distinct.
        for local, domain in ((f"user{i}", "example.com"), (key, "x.io"), (key, "x.c")):
            pad = max(0, lo - len(local) - 1 - len(domain))
            value = local + "_" * pad + "@" + domain
            if len(value) <= hi:
                return value
        return None
    if f.format == "uri":
        for prefix in (f"https://example.com/r{i}", f"h://{key}"):
            value = prefix + "_" * max(0, lo - len(prefix))
            if len(value) <= hi:
                return value
        return None
    if hi == 0:
        return "" if i == 0 else None
    for base in (f"{f.name}-{i}", key):
        value = base + "_" * max(0, lo - len(base))
        if len(value) <= hi:
            return value
    return None


def _datetime_candidate(i: int) -> str:
    # Alternate offsets and fractions: a service may normalise them, and must keep the instant.
    moment = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2))) + timedelta(minutes=i)
    if i % 2:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.250Z")
    return moment.isoformat()


def _number_candidate(f: Field, i: int) -> int | float | None:
    lo, hi = f.minimum, f.maximum
    if f.type == "integer":
        if lo is not None and hi is not None:
            return lo + i if lo + i <= hi else None
        if lo is not None:
            return lo + i
        if hi is not None:
            return hi - i
        return 7 + i
    if lo is not None and hi is not None:
        if lo == hi:
            return lo if i == 0 else None
        return lo + (hi - lo) * (i + 1) / (i + 2)  # distinct, strictly inside the range
    if lo is not None:
        return lo + 1.5 + i
    if hi is not None:
        return hi - 1.5 - i
    return 2.5 + i


def _candidate(f: Field, i: int) -> Any:
    if f.enum is not None:
        # The default goes last, so the first sample shows a stored value rather than a defaulted one.
        values = [v for v in f.enum if v != f.default] + [v for v in f.enum if v == f.default]
        return values[i] if i < len(values) else None
    if f.type == "boolean":
        values = [True, False] if f.default is not True else [False, True]
        return values[i] if i < 2 else None
    if f.type in ("string", "text"):
        return _string_candidate(f, i)
    if f.type == "datetime":
        return _datetime_candidate(i)
    if f.type in ("integer", "number"):
        return _number_candidate(f, i)
    return None


def valid_value(f: Field, i: int) -> Any:
    """The i-th of a series of distinct valid values for a non-ref field, or None when there is none."""
    value = _candidate(f, i)
    if isinstance(value, float) and not math.isfinite(value):
        value = None  # JSON has no infinities
    if value is not None and check_value(f, value) is None:
        return value
    if i == 0 and f.default is not None and check_value(f, f.default) is None:
        return f.default
    return None


def sample_value(f: Field, i: int) -> Any:
    """A valid value for object number i; only unique fields need it to differ between objects."""
    value = valid_value(f, i)
    if value is None and not f.unique:
        value = valid_value(f, 0)
    return value


# ----------------------------------------------------------------------------------- invalid values


class Missing:
    """The field is left out of the request body."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = Missing()


@dataclass(frozen=True)
class Invalid:
    """A value a field must reject, with the rule it breaks."""

    field: str
    case: str
    value: Any
    why: str
    on_update: bool = True  # also sent in a PATCH


TYPE_CASES: dict[str, list[tuple[str, Any]]] = {
    "string": [("type-integer", 123), ("type-array", ["x"])],
    "text": [("type-integer", 123), ("type-object", {"text": "x"})],
    "datetime": [("type-integer", 1714972089)],
    "integer": [("type-string", "5"), ("type-float", 1.5), ("type-integral-float", 1.0), ("type-bool", True)],
    "number": [("type-string", "1.5"), ("type-bool", True)],
    "boolean": [("type-string", "true"), ("type-integer", 1)],
    "ref": [("type-string", "1"), ("type-float", 1.5), ("type-bool", True)],
}
DATETIME_CASES = [
    ("datetime-text", "not a date"),
    ("datetime-newline", "2024-05-06T07:08:09Z\n"),
    ("datetime-date-only", "2024-05-06"),
    ("datetime-no-offset", "2024-05-06T07:08:09"),
    ("datetime-bad-day", "2024-02-30T07:08:09Z"),
    ("datetime-bad-hour", "2024-05-06T25:08:09Z"),
]
FORMAT_EDGE = {
    "email": "user@example",
    "uri": "example.com/path",
    "uuid": "0000000g-0000-4000-8000-000000000000",
}


def _breaking_only(relaxed: Field, f: Field, start: int = 0) -> Any:
    """A value valid for `relaxed` (f minus one rule) but not for f, so it breaks exactly that rule."""
    for i in range(start, start + 20):
        value = valid_value(relaxed, i)
        if value is not None and check_value(f, value) is not None:
            return value
    return None


def invalid_values(f: Field) -> list[Invalid]:
    """Every rule of the field, each with one value that breaks it (as far as the rules allow)."""
    out: list[Invalid] = []
    if f.required:
        if f.default is None:  # a required field with a default: spec v1 does not say which rule wins
            out.append(Invalid(f.name, "missing", MISSING, "a required field is missing", on_update=False))
        out.append(Invalid(f.name, "null", None, "a required field is null"))
    for case, value in TYPE_CASES[f.type]:
        out.append(Invalid(f.name, case, value, f"wrong JSON type for a {f.type} field"))
    if f.type == "ref":
        out.append(Invalid(f.name, "ref-missing", MISSING_ID, f"there is no {f.to} with id {MISSING_ID}"))
        return out
    if f.type == "datetime":
        out += [Invalid(f.name, case, value, "not an RFC 3339 date-time") for case, value in DATETIME_CASES]
        return out
    if f.type == "number":
        out += [Invalid(f.name, "not-finite-nan", math.nan, "NaN is not a number of JSON"),
                Invalid(f.name, "not-finite-infinity", math.inf, "Infinity is not a number of JSON")]
    plain = replace(f, enum=None)
    if f.min_length:
        value = _breaking_only(replace(plain, min_length=None, max_length=f.min_length - 1), f)
        out.append(Invalid(f.name, "min_length", value, f"shorter than min_length {f.min_length}"))
    if f.max_length is not None:
        value = _breaking_only(replace(plain, min_length=f.max_length + 1, max_length=None), f)
        out.append(Invalid(f.name, "max_length", value, f"longer than max_length {f.max_length}"))
    if f.format:
        value = _breaking_only(replace(plain, format=None), f)
        out.append(Invalid(f.name, "format", value, f"not a valid {f.format}"))
        out.append(Invalid(f.name, "format-edge", FORMAT_EDGE[f.format], f"not a valid {f.format}"))
        good = valid_value(f, 0)
        if good is not None:  # the rules match whole values: a trailing newline is not allowed through
            out.append(Invalid(f.name, "format-newline", good + "\n", f"not a valid {f.format}"))
    if f.enum is not None:
        value = _breaking_only(replace(f, enum=None), f) or "not-in-the-enum"
        out.append(Invalid(f.name, "enum", value, f"not one of {list(f.enum)}"))
    if f.minimum is not None and math.isfinite(f.minimum):
        out.append(Invalid(f.name, "minimum", f.minimum - 1 if f.type == "integer" else f.minimum - 0.5,
                           f"below minimum {f.minimum}"))
    if f.maximum is not None and math.isfinite(f.maximum):
        out.append(Invalid(f.name, "maximum", f.maximum + 1 if f.type == "integer" else f.maximum + 0.5,
                           f"above maximum {f.maximum}"))
    # Keep only values that really break a rule: None there means the rules leave no such value.
    return [c for c in out if c.case in ("missing", "null", "ref-missing")
            or (c.value is not None and check_value(f, c.value) is not None)]


# ------------------------------------------------------------------------------------ HTTP and checks


def describe(resp: Any, sent: Any = None) -> str:
    req = resp.request
    text = resp.text if len(resp.text) <= 600 else resp.text[:600] + "..."
    where = f"{req.method} {req.url.path}{'?' + req.url.query.decode() if req.url.query else ''}"
    body = f" with body {json.dumps(sent, default=str)[:400]}" if sent is not None else ""
    return f"{where}{body} -> {resp.status_code} {text}"


def expect(resp: Any, *codes: int, why: str, sent: Any = None) -> Any:
    """Assert the status code; errors must be JSON with a `detail` key. Returns the JSON (or None)."""
    assert resp.status_code in codes, (
        f"expected {' or '.join(map(str, codes))} ({why}), got {describe(resp, sent)}"
    )
    if resp.status_code == 204:
        assert not resp.content, f"a 204 response has an empty body ({why}), got {describe(resp, sent)}"
        return None
    try:
        data = resp.json()
    except ValueError:
        raise AssertionError(f"the response is not JSON ({why}): {describe(resp, sent)}") from None
    if resp.status_code >= 400:
        assert isinstance(data, dict) and "detail" in data, (
            f"an error response is a JSON object with a 'detail' key ({why}), got {describe(resp, sent)}"
        )
    return data


def same_value(f: Field, sent: Any, got: Any) -> bool:
    if sent is None or got is None:
        return sent is None and got is None
    if f.type == "datetime":
        a, b = parse_rfc3339(sent), parse_rfc3339(got) if isinstance(got, str) else None
        return a is not None and b is not None and a == b
    if f.type in ("integer", "ref"):
        return type(got) is int and got == sent
    if f.type == "number":
        return isinstance(got, int | float) and not isinstance(got, bool) and got == sent
    return type(got) is type(sent) and got == sent


def check_object(entity: Entity, obj: Any, context: str) -> None:
    """Every returned object: a JSON object with an integer id and every field, each null or valid."""
    assert isinstance(obj, dict), f"{context}: a {entity.name} must be a JSON object, got {obj!r}"
    assert type(obj.get("id")) is int, f"{context}: a {entity.name} needs an integer 'id', got {obj!r}"
    missing = [f.name for f in entity.fields if f.name not in obj]
    assert not missing, f"{context}: every field appears in a {entity.name}; missing {missing} in {obj!r}"
    for f in entity.fields:
        value = obj[f.name]
        if value is not None:
            problem = check_value(replace(f, enum=None, min_length=None, max_length=None, format=None,
                                          minimum=None, maximum=None), value)
            assert problem is None, f"{context}: {entity.name}.{f.name} = {value!r} on the wire: {problem}"


class Api:
    """A fresh service plus bookkeeping: creates valid objects (parents first) and checks responses."""

    def __init__(self, client: Any, model: Model):
        self.client = client
        self.model = model
        self.counters: dict[str, int] = {}
        self.ids: dict[str, list[int]] = {}
        self._shared_parents: dict[str, dict[str, Any]] = {}

    # -- raw calls
    def send(self, method: str, path: str, body: Any) -> Any:
        # Encoded here rather than by httpx, which refuses NaN: a service must reject it itself.
        content = json.dumps(body, allow_nan=True).encode()
        return self.client.request(method, path, content=content, headers={"content-type": "application/json"})

    def post(self, entity: Entity, body: Any) -> Any:
        return self.send("POST", entity.path, body)

    def get(self, entity: Entity, oid: Any) -> Any:
        return self.client.get(f"{entity.path}/{oid}")

    def patch(self, entity: Entity, oid: Any, body: Any) -> Any:
        return self.send("PATCH", f"{entity.path}/{oid}", body)

    def delete(self, entity: Entity, oid: Any) -> Any:
        return self.client.delete(f"{entity.path}/{oid}")

    def list(self, entity: Entity, **params: Any) -> Any:
        return self.client.get(entity.path, params=params)

    # -- valid objects
    def require_creatable(self, entity: Entity, purpose: str = "") -> None:
        reason = self.model.why_not_creatable(entity.name)
        if reason:
            pytest.skip(f"{reason}{': cannot ' + purpose if purpose else ''}")

    def body(self, entity: Entity, *, full: bool = True, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """A valid create body for the next object; `full` sets optional fields too (refs: parents first)."""
        i = self.counters.get(entity.name, 0)
        self.counters[entity.name] = i + 1
        overrides = overrides or {}
        body: dict[str, Any] = {}
        for f in entity.fields:
            if f.name in overrides:
                if overrides[f.name] is not MISSING:
                    body[f.name] = overrides[f.name]
                continue
            # A unique field left to its default would collide on the second object: always set it.
            if not (f.required or full or (f.unique and f.default is not None and f.type != "ref")):
                continue
            if f.type == "ref":
                body[f.name] = self._parent_id(f)
                continue
            value = sample_value(f, i)
            if value is None and f.required:
                pytest.skip(f"cannot make {i + 1} distinct {entity.name} objects: {f.name} is unique "
                            f"and its constraints allow no more values")
            body[f.name] = value
        return body

    def _parent_id(self, f: Field) -> int | None:
        target = self.model.entity(f.to)
        if self.model.why_not_creatable(target.name):
            if f.required:
                pytest.skip(f"required ref {f.name} -> {f.to}: {self.model.why_not_creatable(target.name)}")
            return None
        if f.unique:
            return self.create(target, full=False)["id"]
        # Non-unique refs share one parent per target: keeps bulk creation cheap.
        if target.name not in self._shared_parents:
            self._shared_parents[target.name] = self.create(target, full=False)
        return self._shared_parents[target.name]["id"]

    def create(self, entity: Entity, overrides: dict[str, Any] | None = None, *, full: bool = True) -> dict[str, Any]:
        body = self.body(entity, full=full, overrides=overrides)
        resp = self.post(entity, body)
        obj = expect(resp, 201, why=f"creating a valid {entity.name}", sent=body)
        check_object(entity, obj, f"POST {entity.path}")
        self.ids.setdefault(entity.name, []).append(obj["id"])
        return obj

    def other_value(self, entity: Entity, f: Field, current: Any) -> Any:
        """A valid value different from `current` and unused by other objects, or MISSING if none."""
        if f.type == "ref":
            target = self.model.entity(f.to)
            if self.model.why_not_creatable(target.name):
                return MISSING
            return self.create(target, full=False)["id"]
        for _ in range(20):
            # Unique fields draw a fresh index of the series; earlier ones may be in use.
            i = self.counters.get(entity.name, 0)
            self.counters[entity.name] = i + 1
            value = valid_value(f, i)
            if value is not None and not same_value(f, value, current):
                return value
        return MISSING

    # -- observations
    def exists(self, entity: Entity, oid: int) -> bool | None:
        """Whether the object exists, through read or list; None if the operations give no way to tell."""
        if entity.has("read"):
            resp = self.get(entity, oid)
            expect(resp, 200, 404, why=f"reading {entity.name} {oid}")
            return resp.status_code == 200
        if entity.has("list"):
            return oid in self.all_ids(entity)
        return None

    def all_ids(self, entity: Entity) -> list[int]:
        ids: list[int] = []
        while True:
            page = expect(self.list(entity, limit=MAX_LIST, offset=len(ids)), 200, why=f"listing {entity.name}")
            ids += [item["id"] for item in page["items"]]
            if not page["items"] or len(ids) >= page["total"]:
                return ids

    def assert_same_fields(self, entity: Entity, sent: dict[str, Any], got: dict[str, Any], context: str) -> None:
        for name, value in sent.items():
            f = entity.field(name)
            assert same_value(f, value, got.get(name)), (
                f"{context}: {entity.name}.{name} was sent as {value!r} and came back as {got.get(name)!r}"
            )
