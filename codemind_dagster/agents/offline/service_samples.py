"""Wire values derived from an intent's field rules: valid samples, edge values and values to reject."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from codemind_dagster.domain.intent import EntitySpec, FieldSpec, check_value

SAMPLES_PER_ENTITY = 5
INT64_MAX = 2**63 - 1
# Edge strings longer than this would bloat the generated test files for little insight.
LONGEST_EDGE = 4096


@dataclass(frozen=True)
class Ref:
    """A required reference in a sample body: the tests resolve it to an object of `entity`."""

    entity: str


def is_valid(f: FieldSpec, value: Any, *, ignore_enum: bool = False) -> bool:
    """check_value's verdict, plus: JSON has no infinities or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return check_value(f, value, ignore_enum=ignore_enum) is None


def _shapes(f: FieldSpec) -> tuple[tuple[str, str], ...]:
    """Prefix and suffix around a number, nicest first; shorter ones for tight max_length."""
    if f.format == "email":
        return (("user", "@example.com"), ("u", "@x.io"), ("", "@b.c"))
    if f.format == "uri":
        return (("https://example.com/items/", ""), ("h://x/", ""), ("h://", ""))
    return ((f"{f.name}-", ""), ("", ""))


def shaped(f: FieldSpec, n: int, length: int | None = None) -> str | None:
    """A string of the field's format holding n, padded to `length` (default: to min_length).

    Padding is "x" between prefix and digits, so distinct n give distinct strings. Enum is ignored.
    """
    for prefix, suffix in _shapes(f):
        digits = str(n)
        natural = len(prefix) + len(digits) + len(suffix)
        target = max(natural, f.min_length or 0) if length is None else length
        if target < natural:
            continue
        value = prefix + "x" * (target - natural) + digits + suffix
        if is_valid(f, value, ignore_enum=True):
            return value
    return None


def _candidate(f: FieldSpec, n: int) -> Any:
    """The n-th of a series of values for a non-ref field, distinct where the type allows; may be invalid."""
    t = f.type
    if t in ("string", "text"):
        if f.enum is not None:
            return f.enum[n] if n < len(f.enum) else None
        if f.format == "uuid":
            return f"00000000-0000-4000-8000-{n:012x}"
        return shaped(f, n)
    if t == "integer":
        if f.minimum is not None:
            return f.minimum + n
        if f.maximum is not None:
            return f.maximum - n
        return n + 1
    if t == "number":
        lo, hi = f.minimum, f.maximum
        if lo is not None and hi is not None:
            return lo + (hi - lo) * n / 4
        if lo is not None:
            return lo + n + 0.5
        if hi is not None:
            return hi - n - 0.5
        return n + 0.5
    if t == "boolean":
        return (True, False)[n % 2]
    if t == "datetime":
        moment = datetime(2024, 1, 15, 9, 30, tzinfo=UTC) + timedelta(hours=n)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


def _first_valid(f: FieldSpec) -> Any:
    value = _candidate(f, 0)
    if value is not None and is_valid(f, value):
        return value
    return f.default


def _same(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same stored value (SQLite compares them equal); True and 1 never meet in one field.
    return type(a) is type(b) and a == b or (isinstance(a, int | float) and isinstance(b, int | float) and a == b)


def entity_samples(e: EntitySpec, count: int = SAMPLES_PER_ENTITY) -> list[dict[str, Any]]:
    """Up to `count` valid create bodies, distinct in every unique field; fewer when the rules allow fewer.

    Every non-ref field is set (None where no value fits an optional field: an absent key would take the
    default, which a unique field can hold only once); required refs are Ref markers, optional refs absent.
    """
    taken: dict[str, list[Any]] = {f.name: [] for f in e.fields if f.unique}
    out: list[dict[str, Any]] = []
    for n in range(count):
        body: dict[str, Any] = {}
        for f in e.fields:
            if f.type == "ref":
                if f.required:
                    body[f.name] = Ref(f.to or "")
                continue
            value = _candidate(f, n)
            if value is None or not is_valid(f, value):
                value = None if f.unique else _first_valid(f)
            if f.unique and value is not None and any(_same(value, v) for v in taken[f.name]):
                value = None
            if value is None and f.required:
                return out
            body[f.name] = value
        for name, values in taken.items():
            if body.get(name) is not None:
                values.append(body[name])
        out.append(body)
    return out


def _distinct(values: list[Any]) -> list[Any]:
    seen: set[tuple[str, str]] = set()
    out = []
    for v in values:
        key = (type(v).__name__, repr(v))
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def edge_values(f: FieldSpec) -> list[Any]:
    """Valid values at the edges of a non-ref field's rules: exact lengths, bounds, every enum member."""
    t = f.type
    candidates: list[Any] = []
    if t in ("string", "text"):
        if f.enum is not None:
            candidates += f.enum
        elif f.format == "uuid":
            candidates += ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"]
        else:
            for length in (f.min_length, f.max_length):
                if length is not None and length <= LONGEST_EDGE:
                    candidates.append(shaped(f, 7, length))
            if f.format == "email":
                candidates.append("first.last+tag@mail.example.org")
            elif f.format == "uri":
                candidates += ["https://example.com/a/b?c=d#e", "urn+x://local"]
            else:
                candidates += ["", "naïve café ✓ 漢字", "two\nlines", "'; DROP TABLE x; --"]
    elif t == "integer":
        candidates += [f.minimum, f.maximum, 0, -1, INT64_MAX, -INT64_MAX - 1]
    elif t == "number":
        candidates += [f.minimum, f.maximum, 0, 7, -2.25, 0.1, 1e300]
    elif t == "boolean":
        candidates += [True, False]
    elif t == "datetime":
        candidates += ["2024-02-29T23:59:59.123456+05:30", "1999-12-31t23:59:59z", "2024-06-01 12:00:00-07:00"]
    return _distinct([v for v in candidates if v is not None and is_valid(f, v)])


def _clamped(n: int, f: FieldSpec) -> int:
    return min(max(n, f.min_length or 0), f.max_length if f.max_length is not None else n)


def invalid_values(f: FieldSpec) -> list[Any]:
    """Values a service must answer with 422, each breaking one rule of the field (never null or absent).

    Most are checked against check_value; a few are rejected by the service beyond it: integers outside
    64 bits (SQLite cannot store them) and ids of refs that name no object.
    """
    t = f.type
    candidates: list[Any] = []
    beyond: list[Any] = []
    if t in ("string", "text", "datetime"):
        candidates += [7, ["x"]]
    if t in ("string", "text"):
        if f.min_length:
            candidates.append("x" * (f.min_length - 1))
        if f.max_length is not None:
            candidates.append("x" * (f.max_length + 1))
        if f.format is not None:
            candidates.append("x" * _clamped(12, f))
            candidates.append({"email": "user@example", "uri": "example.com/x",
                               "uuid": "123e4567e89b12d3a456426614174000"}[f.format])
            valid = _candidate(f, 1)
            if valid is not None:
                candidates.append(f"{valid}\n")  # $ in a regex matches before a final newline: fullmatch
        if f.enum is not None:
            for v in (shaped(f, 99), f.enum[0] + "x", f.enum[0][:-1], f.enum[0].upper(), "x" * _clamped(12, f)):
                if v is not None and is_valid(f, v, ignore_enum=True) and not is_valid(f, v):
                    candidates.append(v)
                    break
    elif t == "integer":
        candidates += ["5", 5.0, True, 2.5]
        beyond += [2**63]
    elif t == "number":
        candidates += ["2.5", True]
        beyond += [2**63]
    elif t == "boolean":
        candidates += [1, "true"]
    elif t == "datetime":
        candidates += ["2024-01-15", "2024-01-15T09:30:00", "2024-02-30T10:00:00Z", "2024-01-15T09:30:00Z\n"]
    elif t == "ref":
        candidates += ["1", True, 1.0]
        beyond += [999999, 0, 2**63]
    if t in ("integer", "number"):
        for bound, step in ((f.minimum, -1), (f.maximum, 1)):
            if bound is not None:
                candidates.append(bound + step)
    return _distinct([v for v in candidates if v is not None and not is_valid(f, v)] + beyond)
