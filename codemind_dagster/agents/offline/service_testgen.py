"""The generated service's own pytest suite: data derived from the intent, plus generic test functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from codemind_dagster.domain.intent import OPERATIONS, EntitySpec, Intent

from .service_pysource import fill, lit, pretty, tidy, width
from .service_samples import edge_values, entity_samples, invalid_values

METHODS = {"create": ("POST", ""), "read": ("GET", "/1"), "update": ("PATCH", "/1"), "delete": ("DELETE", "/1"),
           "list": ("GET", "")}


@dataclass(frozen=True)
class Plan:
    """What the tests can do with one entity: its samples, and whether objects of it can be made at all."""

    entity: EntitySpec
    samples: list[dict[str, Any]]
    makeable: bool

    @property
    def name(self) -> str:
        return self.entity.name

    def has(self, op: str) -> bool:
        return op in self.entity.operations


def plan(intent: Intent) -> dict[str, Plan]:
    """Samples per entity; makeable when its required refs lead (acyclically) to makeable entities."""
    samples = {e.name: entity_samples(e) for e in intent.spec.entities}
    makeable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for e in intent.spec.entities:
            targets = {f.to for f in e.fields if f.type == "ref" and f.required}
            if e.name not in makeable and samples[e.name] and targets <= makeable:
                makeable.add(e.name)
                changed = True
    return {e.name: Plan(e, samples[e.name], e.name in makeable) for e in intent.spec.entities}


def render_tests(intent: Intent) -> dict[str, str]:
    """tests/service_testkit.py (data and helpers) and the tests/test_service_*.py modules."""
    plans = plan(intent)
    files = {
        "tests/service_testkit.py": _testkit(plans),
        "tests/test_service_api.py": _api_tests(plans),
        "tests/test_service_fields.py": _field_tests(plans),
    }
    if any(f.type == "ref" for e in intent.spec.entities for f in e.fields):
        files["tests/test_service_refs.py"] = _ref_tests(plans)
    return files


def _params(items: list[Any], ids: list[str] | None = None, column: int = 0) -> str:
    """A parametrize argument list starting at `column`: plain literals, or pytest.param(...) with ids."""
    if ids is None:
        return pretty(items, 0, column=column)
    lines = []
    for item, ident in zip(items, ids, strict=True):
        line = f"    pytest.param({', '.join(lit(v) for v in item)}, id={lit(ident)}),\n"
        if width(line) > 111:
            args = "".join(f"        {pretty(v, 8)},\n" for v in item)
            line = f"    pytest.param(\n{args}        id={lit(ident)},\n    ),\n"
        lines.append(line)
    return "[\n" + "".join(lines) + "]"


def _test(template: str, **params: list[Any]) -> str:
    """A test function, or nothing when a parameter list is empty (the intent has no such case)."""
    if any(not items for items in params.values()):
        return ""
    columns = {key: line.index(f"<<{key}>>") for line in template.splitlines() for key in params
               if f"<<{key}>>" in line}
    return fill(template, **{key: _params(items, column=columns[key]) for key, items in params.items()})


# ------------------------------------------------------------------------------------------ testkit


TESTKIT = '''"""Test data derived from the intent of the service, and a client that builds valid objects."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Self

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the bundle root, so `service` imports however pytest was started
    sys.path.insert(0, str(ROOT))
# Imported only now that the root is on the path.
create_app = importlib.import_module("service.app").create_app
ApiError = importlib.import_module("service.model").ApiError
SCHEMA_HASH = importlib.import_module("service.model").SCHEMA_HASH

MISSING_ID = 999999  # no test makes this many objects


class Ref:
    """A required reference in a sample, resolved when the sample is used."""

    def __init__(self, entity: str) -> None:
        self.entity = entity


# Per entity: collection path, operations, whether objects can be made at all (required refs lead to
# makeable entities), the field rules the tests need, and valid create bodies, distinct in unique fields.
ENTITIES: dict[str, dict[str, Any]] = <<entities>>


def expected(entity: str, body: dict[str, Any]) -> dict[str, Any]:
    """The stored fields after a create: the value sent, else the default, else null."""
    return {name: body.get(name, spec["default"]) for name, spec in ENTITIES[entity]["fields"].items()}


def assert_fields(obj: dict[str, Any], fields: dict[str, Any]) -> None:
    """Each field as expected, in value and in JSON type (1 is not 1.0, and 1 is not true)."""
    for name, value in fields.items():
        assert obj[name] == value and type(obj[name]) is type(value), (name, obj[name], value)


class Api:
    """A fresh service on private storage (use it in a with block); makes valid objects, parents first."""

    def __init__(self, data_dir: str | None = None, *, raise_server_exceptions: bool = True) -> None:
        self.client = TestClient(create_app(data_dir), raise_server_exceptions=raise_server_exceptions)
        self.store = self.client.app.state.store
        self.made: Counter[str] = Counter()
        self.latest: dict[str, int] = {}
        self.sent: dict[str, Any] = {}

    def __enter__(self) -> Self:
        self.client.__enter__()  # one event loop for all requests instead of one per request
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(*exc)

    @staticmethod
    def path(entity: str, oid: object = None) -> str:
        base = ENTITIES[entity]["path"]
        return base if oid is None else f"{base}/{oid}"

    def body(self, entity: str, n: int | None = None) -> dict[str, Any]:
        """Sample n (by default the next unused one) with its required refs resolved."""
        samples = ENTITIES[entity]["samples"]
        n = self.made[entity] if n is None else n
        assert n < len(samples), f"the rules of {entity} allow only {len(samples)} distinct objects here"
        return {key: self.parent(v.entity) if isinstance(v, Ref) else v for key, v in samples[n].items()}

    def parent(self, entity: str) -> int:
        """The id of an object to refer to: a new one while the samples last, else the latest."""
        if self.made[entity] < len(ENTITIES[entity]["samples"]):
            return self.make(entity)["id"]
        return self.latest[entity]

    def attempt(self, entity: str, body: Any) -> tuple[int, Any]:
        """Create: POST where the entity has a create operation, else straight into the store."""
        if "create" in ENTITIES[entity]["operations"]:
            response = self.client.post(self.path(entity), json=body)
            return response.status_code, response.json()
        try:
            return 201, self.store.create(entity, body)
        except ApiError as error:
            return error.status, {"detail": error.detail}

    def make(self, entity: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new valid object (the next sample, with `values` on top); the body sent is kept in `sent`."""
        body = {**self.body(entity), **(values or {})}
        status, answer = self.attempt(entity, body)
        assert status == 201, (entity, body, answer)
        self.sent = body
        self.made[entity] += 1
        self.latest[entity] = answer["id"]
        return answer

    def send(self, method: str, path: str, raw: bytes) -> Any:
        return self.client.request(method, path, content=raw, headers={"content-type": "application/json"})
'''


def _testkit(plans: dict[str, Plan]) -> str:
    data = {}
    for p in plans.values():
        e = p.entity
        fields = {f.name: {"type": f.type, "required": f.required, "unique": f.unique, "default": f.default,
                           "to": f.to} for f in e.fields}
        data[e.name] = {"path": "/" + e.collection, "operations": tuple(e.operations), "makeable": p.makeable,
                        "fields": fields, "samples": p.samples}
    return tidy(fill(TESTKIT, entities=pretty(data)))


# ---------------------------------------------------------------------------------------- API tests


API_HEAD = '''"""The service over HTTP: health, create, read, update, delete, list, removed operations."""

from __future__ import annotations

<<json>>from collections.abc import Iterator
from pathlib import Path

import pytest
from service_testkit import ENTITIES, MISSING_ID, SCHEMA_HASH, Api, assert_fields, expected

# Request bodies that are not JSON at all, or not a JSON object: each is a 422 and stores nothing.
BAD_BODIES = [
    b"",
    b"{",
    b'{"a": NaN}',
    b'{"a": 1e999}',
    b'{"a": "\\\\ud800"}',
    b"\\xff",
    b"[" * 100000,
    b"[]",
    b'"text"',
    b"7",
    b"null",
]
BAD_PAGING = [
    ("limit", "0"), ("limit", "501"), ("limit", "-1"), ("limit", "x"), ("limit", "1.5"), ("limit", ""),
    ("limit", "99999999999999999999"), ("offset", "-1"), ("offset", "x"), ("offset", "1e3"),
    ("offset", "99999999999999999999"),
]


@pytest.fixture
def api() -> Iterator[Api]:
    with Api() as fresh:
        yield fresh


def test_healthz(api: Api) -> None:
    response = api.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_openapi_describes_every_collection(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert {spec["path"] for spec in ENTITIES.values()} <= {"/" + path.split("/")[1] for path in paths}


def test_errors_are_json_even_for_bugs() -> None:
    def broken() -> None:
        raise RuntimeError("storage is gone")

    with Api(raise_server_exceptions=False) as api:
        api.store.ping = broken
        response = api.client.get("/healthz")
        assert response.status_code == 500 and "detail" in response.json()
        for method, path in (("GET", "/no/such/path"), ("DELETE", "/healthz")):
            response = api.client.request(method, path)
            assert response.status_code in (404, 405) and "detail" in response.json(), (method, path)


def test_data_dir_keeps_objects(tmp_path: Path) -> None:
    with Api(str(tmp_path / "data")) as first:
<<persist>>    assert [p for p in (tmp_path / "data").iterdir() if SCHEMA_HASH in p.name]
'''
PERSIST_OBJECT = '''        made = first.make(<<entity>>)
    with Api(str(tmp_path / "data")) as second:
        assert second.store.fetch(<<entity>>, made["id"]) == made
'''
PERSIST_NOTHING = '''        assert first.client.get("/healthz").status_code == 200
'''

API_TESTS = [
    '''
@pytest.mark.parametrize("entity", <<made>>)
def test_create_returns_stored_object(api: Api, entity: str) -> None:
    made = api.make(entity)
    assert type(made["id"]) is int
    assert_fields(made, expected(entity, api.sent))
    assert api.store.fetch(entity, made["id"]) == made
    if len(ENTITIES[entity]["samples"]) > 1:
        assert api.make(entity)["id"] > made["id"]
''',
    '''
@pytest.mark.parametrize("entity", <<made>>)
def test_create_applies_defaults(api: Api, entity: str) -> None:
    fields = ENTITIES[entity]["fields"]
    body = {name: value for name, value in api.body(entity).items() if fields[name]["required"]}
    status, made = api.attempt(entity, body)
    assert status == 201, made
    assert_fields(made, expected(entity, body))
''',
    '''
@pytest.mark.parametrize("entity", <<optional>>)
def test_create_stores_explicit_nulls(api: Api, entity: str) -> None:
    optional = [name for name, spec in ENTITIES[entity]["fields"].items() if not spec["required"]]
    status, made = api.attempt(entity, {**api.body(entity), **dict.fromkeys(optional)})
    assert status == 201, made
    assert all(made[name] is None for name in optional), made
''',
    '''
@pytest.mark.parametrize(("entity", "field"), <<required>>)
def test_create_needs_required_field(api: Api, entity: str, field: str) -> None:
    body = api.body(entity)
    status, answer = api.attempt(entity, {**body, field: None})
    assert status == 422 and "detail" in answer, answer
    del body[field]
    default = ENTITIES[entity]["fields"][field]["default"]
    status, answer = api.attempt(entity, body)
    if default is None:
        assert status == 422 and "detail" in answer, answer
    else:  # a required field with a default takes the default when the key is absent
        assert status == 201 and answer[field] == default, answer
''',
    '''
@pytest.mark.parametrize("entity", <<create_op>>)
def test_create_rejects_bad_bodies(api: Api, entity: str) -> None:
    base = api.body(entity) if ENTITIES[entity]["makeable"] else {}
    for body in ({**base, "id": 1}, {**base, "not a field": 1.5}, [base], "text", 7, None):
        response = api.send("POST", api.path(entity), json.dumps(body).encode())
        assert response.status_code == 422 and "detail" in response.json(), (body, response.text)
    for raw in BAD_BODIES:
        response = api.send("POST", api.path(entity), raw)
        assert response.status_code == 422 and "detail" in response.json(), (raw[:20], response.text)
    assert api.store.fetch(entity, 1) is None
''',
    '''
@pytest.mark.parametrize("entity", <<read_op>>)
def test_read_unknown_is_404(api: Api, entity: str) -> None:
    for oid in (MISSING_ID, 0, -1, "abc", "1.5", "99999999999999999999", "%20"):
        response = api.client.get(api.path(entity, oid))
        assert response.status_code == 404 and "detail" in response.json(), (oid, response.text)
''',
    '''
@pytest.mark.parametrize("entity", <<read_made>>)
def test_read_returns_object(api: Api, entity: str) -> None:
    made = api.make(entity)
    response = api.client.get(api.path(entity, made["id"]))
    assert response.status_code == 200 and response.json() == made
''',
    '''
@pytest.mark.parametrize("entity", <<update_made>>)
def test_update_changes_only_given_fields(api: Api, entity: str) -> None:
    current = api.make(entity)
    path = api.path(entity, current["id"])
    response = api.client.patch(path, json={})
    assert response.status_code == 200 and response.json() == current
    changes = api.body(entity) if len(ENTITIES[entity]["samples"]) > 1 else {}
    for name, value in changes.items():
        response = api.client.patch(path, json={name: value})
        assert response.status_code == 200, response.text
        current = {**current, name: value}
        assert_fields(response.json(), current)
    assert api.store.fetch(entity, current["id"]) == current
''',
    '''
@pytest.mark.parametrize("entity", <<update_made>>)
def test_update_rejects_bad_bodies_and_nulls(api: Api, entity: str) -> None:
    made = api.make(entity)
    path = api.path(entity, made["id"])
    fields = ENTITIES[entity]["fields"]
    bodies: list[object] = [{"id": made["id"]}, {"not a field": 1}, [], "text", None]
    bodies += [{name: None} for name, spec in fields.items() if spec["required"]]
    for body in bodies:
        response = api.send("PATCH", path, json.dumps(body).encode())
        assert response.status_code == 422 and "detail" in response.json(), (body, response.text)
    for raw in BAD_BODIES[:4]:  # the same parser as for POST
        response = api.send("PATCH", path, raw)
        assert response.status_code == 422 and "detail" in response.json(), (raw[:20], response.text)
    assert api.store.fetch(entity, made["id"]) == made
    optional = dict.fromkeys(name for name, spec in fields.items() if not spec["required"])
    if optional:
        response = api.client.patch(path, json=optional)
        assert response.status_code == 200 and response.json() == {**made, **optional}
''',
    '''
@pytest.mark.parametrize("entity", <<update_op>>)
def test_update_unknown_is_404(api: Api, entity: str) -> None:
    for oid in (MISSING_ID, "abc"):
        response = api.client.patch(api.path(entity, oid), json={})
        assert response.status_code == 404 and "detail" in response.json(), (oid, response.text)
''',
    '''
@pytest.mark.parametrize("entity", <<delete_op>>)
def test_delete_unknown_is_404(api: Api, entity: str) -> None:
    for oid in (MISSING_ID, "abc"):
        response = api.client.delete(api.path(entity, oid))
        assert response.status_code == 404 and "detail" in response.json(), (oid, response.text)
''',
    '''
@pytest.mark.parametrize("entity", <<delete_made>>)
def test_delete_removes_object(api: Api, entity: str) -> None:
    keep = api.make(entity) if len(ENTITIES[entity]["samples"]) > 1 else None
    made = api.make(entity)
    response = api.client.delete(api.path(entity, made["id"]))
    assert response.status_code == 204 and response.content == b""
    assert api.store.fetch(entity, made["id"]) is None
    if keep is not None:
        assert api.store.fetch(entity, keep["id"]) == keep
    if "read" in ENTITIES[entity]["operations"]:
        assert api.client.get(api.path(entity, made["id"])).status_code == 404
    assert api.client.delete(api.path(entity, made["id"])).status_code == 404
''',
    '''
@pytest.mark.parametrize("entity", <<list_op>>)
def test_list_pages_in_id_order(api: Api, entity: str) -> None:
    path = api.path(entity)
    assert api.client.get(path).json() == {"items": [], "total": 0}
    if not ENTITIES[entity]["makeable"]:
        return
    made = [api.make(entity) for _ in range(min(3, len(ENTITIES[entity]["samples"])))]
    ids = [obj["id"] for obj in made]
    assert ids == sorted(set(ids))
    assert api.client.get(path).json() == {"items": made, "total": len(made)}
    for limit, offset, items in ((1, 1, made[1:2]), (500, 0, made), (2, len(made), [])):
        response = api.client.get(path, params={"limit": limit, "offset": offset})
        assert response.json() == {"items": items, "total": len(made)}, (limit, offset)
''',
    '''
@pytest.mark.parametrize("entity", <<list_op>>)
def test_list_rejects_bad_paging(api: Api, entity: str) -> None:
    for key, value in BAD_PAGING:
        response = api.client.get(api.path(entity), params={key: value})
        assert response.status_code == 422 and "detail" in response.json(), (key, value, response.text)
''',
    '''
@pytest.mark.parametrize(("entity", "method", "suffix"), <<removed>>)
def test_removed_operations_answer_405(api: Api, entity: str, method: str, suffix: str) -> None:
    response = api.client.request(method, ENTITIES[entity]["path"] + suffix)
    assert response.status_code == 405 and "detail" in response.json(), response.text
''',
]


def _api_tests(plans: dict[str, Plan]) -> str:
    made = [p for p in plans.values() if p.makeable]
    first = made[0].name if made else None
    # The json import is decided once the tests are known: filled last, and left as a marker until then.
    head = fill(API_HEAD, json="<<json>>",
                persist=fill(PERSIST_OBJECT, entity=lit(first)) if first else PERSIST_NOTHING)
    names = {
        "made": [p.name for p in made],
        "optional": [p.name for p in made if any(not f.required for f in p.entity.fields)],
        "required": [(p.name, f.name) for p in made for f in p.entity.fields if f.required],
        "removed": [(p.name, *METHODS[op]) for p in plans.values() for op in OPERATIONS if not p.has(op)],
    }
    for op in OPERATIONS:
        names[f"{op}_op"] = [p.name for p in plans.values() if p.has(op)]
        names[f"{op}_made"] = [p.name for p in made if p.has(op)]
    tests = []
    for template in API_TESTS:
        keys = {k for k in names if f"<<{k}>>" in template}
        tests.append(_test(template, **{k: names[k] for k in keys}))
    text = head + "\n" + "\n".join(t for t in tests if t)
    return tidy(text.replace("<<json>>", "import json\n" if "json.dumps(" in text else "", 1))


# -------------------------------------------------------------------------------------- field tests


FIELDS_HEAD = '''"""Field rules: edge values pass, each broken rule is a 422, a taken unique value a 409."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from service_testkit import ENTITIES, Api, assert_fields


@pytest.fixture
def api() -> Iterator[Api]:
    with Api() as fresh:
        yield fresh
'''
FIELD_TESTS = [
    '''
@pytest.mark.parametrize(("entity", "field", "values"), <<edges>>)
def test_field_accepts_edge_values(entity: str, field: str, values: list[Any]) -> None:
    room = len(ENTITIES[entity]["samples"])  # objects one service can take before unique values run out
    for start in range(0, len(values), room):
        with Api() as api:
            for value in values[start:start + room]:
                assert_fields(api.make(entity, {field: value}), {field: value})
''',
    '''
@pytest.mark.parametrize(("entity", "field", "values"), <<invalid>>)
def test_field_rejects_invalid_values(api: Api, entity: str, field: str, values: list[Any]) -> None:
    base = api.body(entity, 0)
    for value in values:
        status, answer = api.attempt(entity, {**base, field: value})
        assert status == 422 and "detail" in answer, (value, status, answer)
    if "update" not in ENTITIES[entity]["operations"]:
        return
    made = api.make(entity)
    for value in values:
        response = api.client.patch(api.path(entity, made["id"]), json={field: value})
        assert response.status_code == 422 and "detail" in response.json(), (value, response.text)
    assert api.store.fetch(entity, made["id"]) == made
''',
    '''
@pytest.mark.parametrize(("entity", "field"), <<unique>>)
def test_unique_field_rejects_taken_values(api: Api, entity: str, field: str) -> None:
    spec = ENTITIES[entity]["fields"][field]
    first = api.make(entity, {field: api.parent(spec["to"])} if spec["to"] else None)
    taken = first[field]
    roomy = len(ENTITIES[entity]["samples"]) > api.made[entity]
    body = {**api.body(entity, api.made[entity] if roomy else 0), field: taken}
    status, answer = api.attempt(entity, body)
    assert status == 409 and "detail" in answer, answer
    status, answer = api.attempt(entity, {**body, "not a field": 1})
    assert status == 422, answer  # invalid input is reported before a conflict
    if roomy:
        second = api.make(entity)
        if "update" in ENTITIES[entity]["operations"]:
            response = api.client.patch(api.path(entity, second["id"]), json={field: taken})
            assert response.status_code == 409 and "detail" in response.json(), response.text
            assert api.store.fetch(entity, second["id"]) == second
            response = api.client.patch(api.path(entity, first["id"]), json={field: taken})
            assert response.status_code == 200 and response.json() == first
    if not spec["required"] and len(ENTITIES[entity]["samples"]) >= api.made[entity] + 2:
        for _ in range(2):  # null is no value: any number of objects may leave it unset
            assert api.make(entity, {field: None})[field] is None
''',
]


def _field_tests(plans: dict[str, Plan]) -> str:
    made = [p for p in plans.values() if p.makeable]
    edges, edge_ids, invalid, invalid_ids, unique = [], [], [], [], []
    for p in made:
        for f in p.entity.fields:
            label = f"{p.name}.{f.name}"
            values = edge_values(f) if f.type != "ref" else []
            if values:
                edges.append((p.name, f.name, values))
                edge_ids.append(label)
            values = invalid_values(f)
            if values:
                invalid.append((p.name, f.name, values))
                invalid_ids.append(label)
            usable = plans[f.to].makeable if f.type == "ref" and f.to else p.samples[0].get(f.name) is not None
            if f.unique and usable:
                unique.append((p.name, f.name))
    tests = [
        fill(FIELD_TESTS[0], edges=_params(edges, edge_ids)) if edges else "",
        fill(FIELD_TESTS[1], invalid=_params(invalid, invalid_ids)) if invalid else "",
        _test(FIELD_TESTS[2], unique=unique),
    ]
    return tidy(FIELDS_HEAD + "\n" + "\n".join(t for t in tests if t))


# ------------------------------------------------------------------------------------ reference tests


REFS_HEAD = '''"""References: they name existing objects; on delete, restrict blocks and cascade follows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from service_testkit import ENTITIES, MISSING_ID, Api


@pytest.fixture
def api() -> Iterator[Api]:
    with Api() as fresh:
        yield fresh
'''
REF_TESTS = [
    '''
@pytest.mark.parametrize(("entity", "field"), <<refs>>)
def test_ref_names_an_existing_object(api: Api, entity: str, field: str) -> None:
    spec = ENTITIES[entity]["fields"][field]
    parent = api.parent(spec["to"])
    made = api.make(entity, {field: parent})
    assert made[field] == parent
    if "update" not in ENTITIES[entity]["operations"]:
        return
    path = api.path(entity, made["id"])
    other = api.parent(spec["to"])
    response = api.client.patch(path, json={field: other})
    assert response.status_code == 200 and response.json()[field] == other, response.text
    response = api.client.patch(path, json={field: MISSING_ID})
    assert response.status_code == 422 and "detail" in response.json(), response.text
    if not spec["required"]:
        response = api.client.patch(path, json={field: None})
        assert response.status_code == 200 and response.json()[field] is None, response.text
''',
    '''
@pytest.mark.parametrize(("entity", "field"), <<restrict>>)
def test_restrict_blocks_delete_while_referenced(api: Api, entity: str, field: str) -> None:
    target = ENTITIES[entity]["fields"][field]["to"]
    parent = api.make(target)
    child = api.make(entity, {field: parent["id"]})
    response = api.client.delete(api.path(target, parent["id"]))
    assert response.status_code == 409 and "detail" in response.json(), response.text
    assert api.store.fetch(target, parent["id"]) == parent
    assert api.store.fetch(entity, child["id"]) == child
    if "delete" in ENTITIES[entity]["operations"]:
        assert api.client.delete(api.path(entity, child["id"])).status_code == 204
        assert api.client.delete(api.path(target, parent["id"])).status_code == 204
''',
    '''
@pytest.mark.parametrize(("entity", "field"), <<cascade>>)
def test_cascade_deletes_referencing_objects(api: Api, entity: str, field: str) -> None:
    target = ENTITIES[entity]["fields"][field]["to"]
    parent = api.make(target)
    family = [api.make(entity, {field: parent["id"]})]
    if entity == target:  # a self-reference cascades down the whole chain
        family.append(api.make(entity, {field: family[-1]["id"]}))
    response = api.client.delete(api.path(target, parent["id"]))
    assert response.status_code == 204, response.text
    assert api.store.fetch(target, parent["id"]) is None
    for obj in family:
        assert api.store.fetch(entity, obj["id"]) is None
''',
    '''
@pytest.mark.parametrize(("entity", "field", "holder", "hold"), <<blocked>>)
def test_cascade_stops_at_restrict(api: Api, entity: str, field: str, holder: str, hold: str) -> None:
    target = ENTITIES[entity]["fields"][field]["to"]
    parent = api.make(target)
    child = api.make(entity, {field: parent["id"]})
    held = api.make(holder, {hold: child["id"]})
    response = api.client.delete(api.path(target, parent["id"]))
    assert response.status_code == 409 and "detail" in response.json(), response.text
    for name, obj in ((target, parent), (entity, child), (holder, held)):
        assert api.store.fetch(name, obj["id"]) == obj  # nothing was deleted
''',
]


def _room(plans: dict[str, Plan], *makes: str, margin: int = 0) -> bool:
    """Whether a test can make these objects explicitly (an entity named twice: two objects of it).

    Parents made along the way reuse the latest object once the samples run out; `margin` keeps
    that reuse away from the explicit objects where it would change what the test sees.
    """
    return all(plans[n].makeable and len(plans[n].samples) >= makes.count(n) + margin for n in makes)


def _ref_tests(plans: dict[str, Plan]) -> str:
    edges = [(p, f) for p in plans.values() for f in p.entity.fields if f.type == "ref" and f.to]
    refs = [(p.name, f.name) for p, f in edges if _room(plans, p.name, f.to)]
    restrict, cascade, blocked = [], [], []
    for p, f in edges:
        target = f.to or ""
        if not plans[target].has("delete"):
            continue
        if f.effective_on_delete == "restrict":
            if _room(plans, target, p.name):
                restrict.append((p.name, f.name))
            continue
        if _room(plans, target, p.name, *([p.name] if p.name == target else [])):
            cascade.append((p.name, f.name))
        for x, h in edges:
            if h.to == p.name and h.effective_on_delete == "restrict" and _room(plans, target, p.name, x.name,
                                                                                 margin=1):
                blocked.append((p.name, f.name, x.name, h.name))
    tests = [_test(REF_TESTS[0], refs=refs), _test(REF_TESTS[1], restrict=restrict),
             _test(REF_TESTS[2], cascade=cascade), _test(REF_TESTS[3], blocked=blocked)]
    return tidy(REFS_HEAD + "\n" + "\n".join(t for t in tests if t))
