"""Contract tests of a generated service (spec v1 section 2), derived from the intent in intent.json."""

# Copied verbatim into a code bundle as contract_tests/test_contract_api.py. The only coupling to the
# code is `service.app.create_app()`: a fresh ASGI app with its own empty storage, one per test.

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # contract_support, and the bundle root for `service`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import re
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # test-client deprecation notices are about this harness, not the code
    from fastapi.testclient import TestClient

from contract_support import (
    MAX_LIST,
    MISSING,
    MISSING_ID,
    Api,
    Entity,
    Model,
    check_object,
    describe,
    expect,
    invalid_values,
    same_value,
)

MODEL = Model.load(HERE / "intent.json")


@pytest.fixture
def api():
    from service.app import create_app

    with TestClient(create_app()) as client:
        yield Api(client, MODEL)


def _params(items: list[tuple[object, str]], none_reason: str, arity: int = 1) -> list:
    """pytest params with readable ids; a single skipped param when the intent has no such case."""
    return [pytest.param(*(value if arity > 1 else (value,)), id=ident) for value, ident in items] or [
        pytest.param(*[None] * arity, id="none", marks=pytest.mark.skip(reason=none_reason))
    ]


ENTITIES = _params([(e.name, e.name) for e in MODEL.entities], "the intent has no entities")


def entity_of(name: str, *ops: str) -> Entity:
    entity = MODEL.entity(name)
    missing = [op for op in ops if not entity.has(op)]
    if missing:
        pytest.skip(f"{name} has no {' / '.join(missing)} operation")
    return entity


def state_of(entity: Entity, obj: dict) -> dict:
    return {f.name: obj[f.name] for f in entity.fields}


# ------------------------------------------------------------------------------------------- health


def test_healthz(api: Api) -> None:
    data = expect(api.client.get("/healthz"), 200, why="GET /healthz reports health")
    assert data == {"status": "ok"}, f"GET /healthz must return {{'status': 'ok'}}, got {data!r}"


# ------------------------------------------------------------------------------------------- create


@pytest.mark.parametrize("name", ENTITIES)
def test_create(api: Api, name: str) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e)
    body = api.body(e, full=True)
    obj = expect(api.post(e, body), 201, why=f"creating a valid {name} with every field set", sent=body)
    check_object(e, obj, f"POST {e.path}")
    api.assert_same_fields(e, body, obj, f"POST {e.path}")
    second = api.create(e)
    assert second["id"] > obj["id"], f"ids ascend: {name} created after id {obj['id']} got id {second['id']}"


@pytest.mark.parametrize("name", ENTITIES)
def test_create_applies_defaults(api: Api, name: str) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e)
    body = api.body(e, full=False, overrides={f.name: MISSING for f in e.fields if not f.required})
    obj = expect(api.post(e, body), 201, why=f"creating a {name} with only its required fields", sent=body)
    check_object(e, obj, f"POST {e.path}")
    api.assert_same_fields(e, body, obj, f"POST {e.path}")
    for f in e.fields:
        if f.name not in body:
            assert same_value(f, f.default, obj[f.name]), (
                f"POST {e.path} without {f.name}: expected "
                + (f"its default {f.default!r}" if f.default is not None else "null")
                + f", got {obj[f.name]!r}"
            )


@pytest.mark.parametrize("name", ENTITIES)
def test_create_explicit_nulls(api: Api, name: str) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e)
    optional = [f for f in e.fields if not f.required]
    if not optional:
        pytest.skip(f"{name} has no optional fields")
    body = api.body(e, full=False, overrides={f.name: None for f in optional})
    obj = expect(api.post(e, body), 201, why=f"null is a valid value for optional fields of {name}", sent=body)
    check_object(e, obj, f"POST {e.path}")
    for f in optional:
        assert obj[f.name] is None, f"POST {e.path} with {f.name}: null stores null (not a default), got {obj!r}"


# --------------------------------------------------------------------------------------------- read


@pytest.mark.parametrize("name", ENTITIES)
def test_read(api: Api, name: str) -> None:
    e = entity_of(name, "create", "read")
    api.require_creatable(e)
    obj = api.create(e)
    got = expect(api.get(e, obj["id"]), 200, why=f"reading the {name} just created")
    check_object(e, got, f"GET {e.path}/{obj['id']}")
    assert got["id"] == obj["id"]
    api.assert_same_fields(e, state_of(e, obj), got, f"GET {e.path}/{obj['id']}")


@pytest.mark.parametrize("name", ENTITIES)
def test_read_missing(api: Api, name: str) -> None:
    e = entity_of(name, "read")
    expect(api.get(e, MISSING_ID), 404, why=f"there is no {name} {MISSING_ID}")


# ------------------------------------------------------------------------------------------- update


@pytest.mark.parametrize("name", ENTITIES)
def test_update(api: Api, name: str) -> None:
    e = entity_of(name, "create", "update")
    api.require_creatable(e, "make an object to update")
    obj = api.create(e)
    oid, state = obj["id"], state_of(e, obj)
    got = expect(api.patch(e, oid, {}), 200, why="an empty PATCH is a valid update that changes nothing", sent={})
    check_object(e, got, f"PATCH {e.path}/{oid}")
    api.assert_same_fields(e, state, got, f"PATCH {e.path}/{oid} with {{}}")
    for f in e.fields:
        new = api.other_value(e, f, state[f.name])
        if new is MISSING:
            continue
        patch = {f.name: new}
        got = expect(api.patch(e, oid, patch), 200, why=f"updating {name}.{f.name} alone", sent=patch)
        check_object(e, got, f"PATCH {e.path}/{oid}")
        assert got["id"] == oid
        assert same_value(f, new, got[f.name]), f"PATCH {e.path}/{oid} {patch}: {f.name} became {got[f.name]!r}"
        others = {k: v for k, v in state.items() if k != f.name}
        api.assert_same_fields(e, others, got, f"PATCH {e.path}/{oid} {patch} (a partial update)")
        state[f.name] = got[f.name]
    optional = {f.name: None for f in e.fields if not f.required}
    if optional:
        got = expect(api.patch(e, oid, optional), 200, why="optional fields can be set to null", sent=optional)
        state.update(optional)
        api.assert_same_fields(e, state, got, f"PATCH {e.path}/{oid} {optional}")
    if e.has("read"):
        got = expect(api.get(e, oid), 200, why=f"reading the updated {name}")
        api.assert_same_fields(e, state, got, f"GET {e.path}/{oid} after updates")


@pytest.mark.parametrize("name", ENTITIES)
def test_update_missing(api: Api, name: str) -> None:
    e = entity_of(name, "update")
    expect(api.patch(e, MISSING_ID, {}), 404, why=f"there is no {name} {MISSING_ID}", sent={})


# ------------------------------------------------------------------------------------------- delete


@pytest.mark.parametrize("name", ENTITIES)
def test_delete(api: Api, name: str) -> None:
    e = entity_of(name, "create", "delete")
    api.require_creatable(e, "make an object to delete")
    keep, obj = api.create(e), api.create(e)
    expect(api.delete(e, obj["id"]), 204, why=f"deleting a {name} nothing refers to")
    assert api.exists(e, obj["id"]) in (False, None), f"{name} {obj['id']} still exists after DELETE"
    assert api.exists(e, keep["id"]) in (True, None), f"DELETE of {name} {obj['id']} removed {keep['id']} too"
    expect(api.delete(e, obj["id"]), 404, why=f"{name} {obj['id']} is already deleted")


@pytest.mark.parametrize("name", ENTITIES)
def test_delete_missing(api: Api, name: str) -> None:
    e = entity_of(name, "delete")
    expect(api.delete(e, MISSING_ID), 404, why=f"there is no {name} {MISSING_ID}")


# --------------------------------------------------------------------------------------------- list


def _page(api: Api, e: Entity, **params) -> dict:
    data = expect(api.list(e, **params), 200, why=f"listing {e.name} with {params or 'no parameters'}")
    assert isinstance(data, dict) and isinstance(data.get("items"), list) and type(data.get("total")) is int, (
        f"GET {e.path} returns {{'items': [...], 'total': N}}, got {str(data)[:300]}"
    )
    ids = [item.get("id") if isinstance(item, dict) else item for item in data["items"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), f"GET {e.path} {params}: ids not ascending: {ids}"
    for item in data["items"]:
        check_object(e, item, f"GET {e.path}")
    return data


@pytest.mark.parametrize("name", ENTITIES)
def test_list(api: Api, name: str) -> None:
    e = entity_of(name, "list")
    empty = _page(api, e)
    assert empty["items"] == [] and empty["total"] == 0, f"a fresh service has no {name}: {empty}"
    if not e.has("create"):
        pytest.skip(f"{name} has no create operation: only the empty list is checked")
    api.require_creatable(e, "fill the list")
    created = [api.create(e) for _ in range(3)]
    ids = api.ids[name]
    assert ids == sorted(ids), f"ids of {name} ascend in creation order, got {ids}"
    data = _page(api, e)
    assert data["total"] == len(ids) and [i["id"] for i in data["items"]] == ids, (
        f"GET {e.path}: expected ids {ids} and total {len(ids)}, got {data}"
    )
    by_id = {item["id"]: item for item in data["items"]}
    for obj in created:
        api.assert_same_fields(e, state_of(e, obj), by_id[obj["id"]], f"GET {e.path} item {obj['id']}")


@pytest.mark.parametrize("name", ENTITIES)
def test_list_paging(api: Api, name: str) -> None:
    e = entity_of(name, "create", "list")
    api.require_creatable(e, "fill the list")
    for _ in range(5):
        api.create(e, full=False)
    ids = api.ids[name]
    n = len(ids)
    for limit, offset in ((2, 0), (2, 2), (2, 4), (3, n - 1), (1, n), (5, n + 10), (MAX_LIST, 0)):
        data = _page(api, e, limit=limit, offset=offset)
        got = [item["id"] for item in data["items"]]
        assert got == ids[offset:offset + limit], f"GET {e.path}?limit={limit}&offset={offset}: ids {got}, " \
                                                  f"expected {ids[offset:offset + limit]}"
        assert data["total"] == n, f"total counts all {n} {name} objects whatever the page, got {data['total']}"


@pytest.mark.parametrize("name", ENTITIES)
def test_list_default_limit(api: Api, name: str) -> None:
    e = entity_of(name, "create", "list")
    api.require_creatable(e, "fill the list")
    while len(api.ids.get(name, [])) < 51:
        api.create(e, full=False)
    ids = api.ids[name]
    data = _page(api, e)
    assert [i["id"] for i in data["items"]] == ids[:50], f"GET {e.path} returns the first 50 by default"
    assert data["total"] == len(ids)
    assert [i["id"] for i in _page(api, e, offset=50)["items"]] == ids[50:], f"GET {e.path}?offset=50"


BAD_PAGING = [("limit", "0"), ("limit", "-1"), ("limit", "x"), ("limit", "1.5"), ("offset", "-1"), ("offset", "x")]


@pytest.mark.parametrize(
    "name,key,value",
    _params([((e.name, k, v), f"{e.name}-{k}={v}") for e in MODEL.entities if e.has("list") for k, v in BAD_PAGING],
            "no entity has a list operation", 3),
)
def test_list_rejects(api: Api, name: str, key: str, value: str) -> None:
    e = MODEL.entity(name)
    expect(api.list(e, **{key: value}), 422, why=f"{key} must be an integer in range")


@pytest.mark.parametrize("name", ENTITIES)
def test_list_limit_above_500(api: Api, name: str) -> None:
    e = entity_of(name, "list")
    resp = api.list(e, limit=MAX_LIST + 1)
    data = expect(resp, 422, 200, why=f"limit is at most {MAX_LIST}")
    if resp.status_code == 200:
        assert len(data["items"]) <= MAX_LIST


# ----------------------------------------------------------------------------------- invalid input


REJECTS = _params(
    [((e.name, c), f"{e.name}.{c.field}-{c.case}") for e in MODEL.entities for f in e.fields for c in invalid_values(f)],
    "no field has a rule to break",
    2,
)


def _assert_count(api: Api, e: Entity, context: str) -> None:
    """The list holds exactly the objects this test created (the app is fresh)."""
    if e.has("list"):
        expected = len(api.ids.get(e.name, []))
        total = _page(api, e, limit=1)["total"]
        assert total == expected, f"{context}: {expected} {e.name} objects were created, the list counts {total}"


@pytest.mark.parametrize("name,case", REJECTS)
def test_rejects(api: Api, name: str, case) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e, "build a body around the invalid value")
    obj = api.create(e) if case.on_update and e.has("update") else None
    why = f"{name}.{case.field} = {repr(case.value)[:80]}: {case.why}"
    body = api.body(e, overrides={case.field: case.value})
    resp = api.post(e, body)
    expect(resp, 422, why=why, sent=body)
    if obj is not None:
        patch = {case.field: case.value}
        expect(api.patch(e, obj["id"], patch), 422, why=why, sent=patch)
        if e.has("read"):
            got = expect(api.get(e, obj["id"]), 200, why=f"reading {name} after a rejected PATCH")
            api.assert_same_fields(e, state_of(e, obj), got, f"a rejected PATCH {e.path}/{obj['id']} {patch}")
    _assert_count(api, e, f"a rejected POST {e.path} stores nothing")


BODY_CASES = ["unknown-field", "id-in-body", "body-array", "body-string", "body-invalid-json"]


def _send(api: Api, method: str, path: str, case: str, valid: dict):
    if case == "body-invalid-json":
        return api.client.request(method, path, content=b'{"a": ', headers={"content-type": "application/json"}), None
    body = {
        "unknown-field": {**valid, "no_such_field_in_the_intent": 1},
        "id-in-body": {**valid, "id": MISSING_ID},
        "body-array": [valid],
        "body-string": "text",
    }[case]
    return api.client.request(method, path, json=body), body


@pytest.mark.parametrize(
    "name,case",
    _params([((e.name, c), f"{e.name}-{c}") for e in MODEL.entities for c in BODY_CASES], "no entities", 2),
)
def test_rejects_body(api: Api, name: str, case: str) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e, "build a body")
    resp, sent = _send(api, "POST", e.path, case, api.body(e))
    expect(resp, 422, why=f"a {name} body must be a JSON object of known fields ({case})", sent=sent)
    _assert_count(api, e, f"a rejected POST {e.path} stores nothing")
    if e.has("update"):
        obj = api.create(e)
        resp, sent = _send(api, "PATCH", f"{e.path}/{obj['id']}", case, {})
        expect(resp, 422, why=f"a {name} PATCH body must be a JSON object of known fields ({case})", sent=sent)


# ------------------------------------------------------------------------------------------- unique


UNIQUE = _params(
    [((e.name, f.name), f"{e.name}.{f.name}") for e in MODEL.entities for f in e.fields if f.unique],
    "no unique fields in this intent",
    2,
)


@pytest.mark.parametrize("name,field", UNIQUE)
def test_unique(api: Api, name: str, field: str) -> None:
    e = entity_of(name, "create")
    api.require_creatable(e, f"test the uniqueness of {field}")
    f = e.field(field)
    a = api.create(e)
    taken = a[field]
    if taken is None:
        pytest.skip(f"the constraints of {name}.{field} leave no value to duplicate")
    body = api.body(e, overrides={field: taken})
    expect(api.post(e, body), 409, why=f"{name}.{field} = {taken!r} is taken (unique)", sent=body)
    _assert_count(api, e, f"a conflicting POST {e.path} stores nothing")
    bad = next((c for g in e.fields if g.name != field for c in invalid_values(g) if c.case.startswith("type-")),
               None)
    if bad is not None:
        body = api.body(e, overrides={field: taken, bad.field: bad.value})
        expect(api.post(e, body), 422, why=f"invalid input ({bad.field}: {bad.why}) is reported before a conflict",
               sent=body)
    if e.has("update"):
        b = api.create(e)
        if b[field] is not None:
            patch = {field: taken}
            expect(api.patch(e, b["id"], patch), 409, why=f"{name}.{field} = {taken!r} is taken", sent=patch)
            if e.has("read"):
                got = expect(api.get(e, b["id"]), 200, why=f"reading {name} after a conflicting PATCH")
                assert same_value(f, b[field], got[field]), f"a conflicting PATCH changed {field}: {got!r}"
        patch = {field: taken}
        expect(api.patch(e, a["id"], patch), 200, why="an object keeping its own unique value is no conflict",
               sent=patch)
    if not f.required:
        api.create(e, {field: None})
        api.create(e, {field: None})  # null is not a value: any number of objects may leave it unset


# ------------------------------------------------------------------------------- references on delete


def _edges(on_delete: str) -> list:
    return [(edge, edge.label) for edge in MODEL.edges() if edge.on_delete == on_delete]


def _chains(first: str, second: str) -> list:
    """Parent <-first- child <-second- grandchild, as pairs of ref edges."""
    return [
        ((a, b), f"{a.label}>{b.label}")
        for a in MODEL.edges() if a.on_delete == first
        for b in MODEL.edges() if b.on_delete == second and b.parent == a.child
    ]


def _exists(api: Api, e: Entity, oid: int, purpose: str) -> bool:
    found = api.exists(e, oid)
    if found is None:
        pytest.skip(f"{e.name} has neither read nor list: cannot {purpose}")
    return found


def _family(api: Api, *edges) -> list[tuple[Entity, dict]]:
    """Objects linked along the edges: the first edge's parent, its child, the grandchild..."""
    top = MODEL.entity(edges[0].parent)
    entities = [top] + [MODEL.entity(edge.child) for edge in edges]
    for e in entities:
        entity_of(e.name, "create")
        api.require_creatable(e, "build the chain of references")
    entity_of(top.name, "delete")
    family = [(top, api.create(top, full=False))]
    for edge in edges:
        child = MODEL.entity(edge.child)
        family.append((child, api.create(child, {edge.field: family[-1][1]["id"]}, full=False)))
    return family


@pytest.mark.parametrize("edge", _params(_edges("restrict"), "no restrict references in this intent"))
def test_delete_restrict(api: Api, edge) -> None:
    (parent, p), (child, c) = _family(api, edge)
    resp = api.delete(parent, p["id"])
    expect(resp, 409, why=f"{child.name} {c['id']} still refers to it through {edge.label} (restrict)")
    assert _exists(api, parent, p["id"], "check the parent survived"), f"{parent.name} was deleted despite 409"
    assert _exists(api, child, c["id"], "check the child survived"), f"{child.name} was deleted by a refused DELETE"
    if not child.has("delete"):
        return  # the reference can never be released through the API
    expect(api.delete(child, c["id"]), 204, why=f"deleting the {child.name} that held the reference")
    expect(api.delete(parent, p["id"]), 204, why=f"nothing refers to the {parent.name} any more")


@pytest.mark.parametrize("edge", _params(_edges("cascade"), "no cascade references in this intent"))
def test_delete_cascade(api: Api, edge) -> None:
    (parent, p), (child, c) = _family(api, edge)
    expect(api.delete(parent, p["id"]), 204, why=f"{edge.label} cascades: the {child.name} goes with it")
    assert not _exists(api, child, c["id"], "see the cascade"), (
        f"DELETE {parent.path}/{p['id']} must delete {child.name} {c['id']} ({edge.label} is on_delete: cascade)"
    )
    assert not _exists(api, parent, p["id"], "see the delete"), f"{parent.name} {p['id']} still exists"


@pytest.mark.parametrize("edges", _params(_chains("cascade", "cascade"), "no chain of two cascade references"))
def test_delete_cascade_recursive(api: Api, edges) -> None:
    family = _family(api, *edges)
    (parent, p) = family[0]
    expect(api.delete(parent, p["id"]), 204, why="cascades delete recursively")
    for e, obj in family:
        assert not _exists(api, e, obj["id"], "see the cascade"), (
            f"DELETE {parent.path}/{p['id']} must delete {e.name} {obj['id']} down the cascade chain"
        )


@pytest.mark.parametrize("edges", _params(_chains("cascade", "restrict"), "no cascade followed by a restrict"))
def test_delete_cascade_blocked_by_restrict(api: Api, edges) -> None:
    family = _family(api, *edges)
    (parent, p), (child, c), _ = family
    expect(api.delete(parent, p["id"]), 409,
           why=f"the cascade would delete {child.name} {c['id']}, which {edges[1].label} holds (restrict)")
    for e, obj in family:
        assert _exists(api, e, obj["id"], "check nothing was deleted"), (
            f"a refused DELETE {parent.path}/{p['id']} deleted {e.name} {obj['id']}"
        )


# --------------------------------------------------------------------------------- removed operations


REMOVED = _params(
    [((e.name, op), f"{e.name}-{op}") for e in MODEL.entities for op in ("create", "read", "update", "delete", "list")
     if not e.has(op)],
    "every entity has all five operations",
    2,
)


@pytest.mark.parametrize("name,op", REMOVED)
def test_removed_operation(api: Api, name: str, op: str) -> None:
    e = MODEL.entity(name)
    why = f"{op} is not among the operations of {name}"
    if op == "create":
        body = api.body(e)
        expect(api.post(e, body), 404, 405, why=why, sent=body)
        _assert_count(api, e, f"POST {e.path} creates nothing when {why}")
        return
    if op == "list":
        expect(api.list(e), 404, 405, why=why)
        return
    obj = None
    if e.has("create") and not MODEL.why_not_creatable(name):
        obj = api.create(e)
    oid = obj["id"] if obj else 1
    if op == "read":
        expect(api.get(e, oid), 404, 405, why=why)
    elif op == "update":
        expect(api.patch(e, oid, {}), 404, 405, why=why, sent={})
    elif op == "delete":
        expect(api.delete(e, oid), 404, 405, why=why)
        if obj is not None:
            assert api.exists(e, oid) in (True, None), f"DELETE {e.path}/{oid} deleted it although {why}"


# ------------------------------------------------------------------------------------------- metrics

# GET /metrics is served by the platform layer every release runs in front of the app (codemind_service.py,
# shipped with this suite): these tests check it against this service's own routes.

SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Metric types and samples of a Prometheus text exposition; a line that is neither fails the test."""
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("#") or not line:
            continue
        else:
            m = SAMPLE_RE.fullmatch(line)
            assert m, f"/metrics line is not a Prometheus sample: {line!r}"
            labels = dict(LABEL_RE.findall(m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"/metrics sample {name} has no # TYPE line"
    return types, samples


def series(samples, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in match.items())]


@pytest.fixture
def metered():
    from codemind_service import instrument
    from service.app import create_app

    with TestClient(instrument(create_app())) as client:
        yield Api(client, MODEL)


def test_metrics(metered: Api) -> None:
    client = metered.client
    expect(client.get("/healthz"), 200, why="GET /healthz reports health")
    listed = [e for e in MODEL.entities if e.has("list")]
    read = [e for e in MODEL.entities if e.has("read")]
    for e in listed:
        expect(metered.list(e), 200, why=f"GET {e.path} lists")
    for e in read:
        expect(metered.get(e, MISSING_ID), 404, why=f"GET {e.path}/{MISSING_ID} names no object")
    resp = client.get("/metrics")
    assert resp.status_code == 200, f"GET /metrics must answer 200, got {describe(resp)}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, f"GET /metrics content-type {ctype!r}"
    types, samples = parse_exposition(resp.text)
    assert types.get("http_requests_total") == "counter", "http_requests_total must be a counter"
    assert types.get("http_request_duration_seconds") == "histogram", "the latency must be a histogram"
    assert types.get("http_requests_in_flight") == "gauge", "in-flight requests must be a gauge"
    for name in ("process_cpu_seconds_total", "python_info"):
        assert name in types, f"/metrics has no process metric {name}"

    assert series(samples, "http_requests_total", method="GET", route="/healthz", status="200"), (
        "GET /healthz is not counted under route=/healthz, status=200")
    for e in listed:
        found = series(samples, "http_requests_total", method="GET", route=e.path, status="200")
        assert found and found[0][1] >= 1, f"GET {e.path} is not counted under route={e.path}, status=200"
    template = {e.name: re.compile(re.escape(e.path) + r"/\{[^}/]+\}") for e in read}
    for e in read:
        found = [labels for labels, _ in series(samples, "http_requests_total", method="GET", status="404")
                 if template[e.name].fullmatch(labels["route"])]
        assert found, f"GET {e.path}/{{id}} 404 is not counted under its route template"
    routes = {labels.get("route", "") for _, labels, _ in samples}
    assert not any(str(MISSING_ID) in r for r in routes), f"ids leaked into route labels: {sorted(routes)}"
    assert "/metrics" not in routes, "scrapes of /metrics must not count as traffic"

    for labels, count in series(samples, "http_request_duration_seconds_count"):
        key = {"method": labels["method"], "route": labels["route"]}
        buckets = series(samples, "http_request_duration_seconds_bucket", **key)
        values = [v for _, v in sorted(buckets, key=lambda b: float(b[0]["le"]))]
        assert values == sorted(values), f"histogram buckets of {key} decrease: {values}"
        assert buckets and values[-1] == count, f"the +Inf bucket of {key} is not its count"
        answered = sum(v for _, v in series(samples, "http_requests_total", **key))
        assert answered == count, f"{key}: {answered} requests counted but {count} timed"
    in_flight = series(samples, "http_requests_in_flight", method="GET")
    assert in_flight and in_flight[0][1] == 0, f"no request is in flight once all were answered: {in_flight}"


def test_metrics_is_read_only(metered: Api) -> None:
    resp = metered.client.post("/metrics", content=b"{}")
    assert resp.status_code == 405, f"POST /metrics must answer 405, got {describe(resp)}"
