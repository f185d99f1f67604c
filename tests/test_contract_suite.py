"""Tests of the contract suite: its rules agree with the intent model, and it passes good code, fails bad code."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from codemind_dagster.agents.contract import template_contract_support as support
from codemind_dagster.agents.contract.suite import render_contract_suite
from codemind_dagster.domain import intent as intent_mod
from codemind_dagster.domain.intent import FieldSpec, parse_intent_text
from codemind_dagster.resources.sandbox import SubprocessSandbox

REPO = Path(__file__).resolve().parents[1]

RICH = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: contract-demo}
spec:
  summary: Every rule the HTTP contract has, in one intent.
  entities:
    - name: Customer
      fields:
        - {name: email, type: string, required: true, unique: true, format: email, max_length: 60}
        - {name: name, type: string, required: true, min_length: 2, max_length: 20}
        - {name: tier, type: string, enum: [bronze, silver, gold], default: bronze}
        - {name: points, type: integer, minimum: 0, maximum: 1000000, default: 0}
        - {name: website, type: string, format: uri}
        - {name: external_id, type: string, format: uuid, unique: true}
        - {name: active, type: boolean, default: true}
        - {name: born_at, type: datetime}
        - {name: notes, type: text, max_length: 200}
        - {name: rating, type: number, minimum: 0, maximum: 5}
    - name: Order
      plural: purchase_orders
      fields:
        - {name: customer_id, type: ref, to: Customer, required: true, on_delete: cascade}
        - {name: total, type: number, minimum: 0, required: true}
        - {name: placed_at, type: datetime, required: true}
    - name: Invoice
      fields:
        - {name: order_id, type: ref, to: Order, required: true, unique: true}
        - {name: number, type: string, required: true, unique: true, min_length: 3}
    - name: Category
      fields:
        - {name: title, type: string, required: true}
        - {name: parent_id, type: ref, to: Category, on_delete: cascade}
    - name: AuditEntry
      plural: audit_log
      operations: [create, read, list]
      fields:
        - {name: customer_id, type: ref, to: Customer}
        - {name: message, type: text, required: true, min_length: 1}
"""

IMPOSSIBLE = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata: {name: impossible}
spec:
  summary: Nothing here can be created through the API.
  entities:
    - name: Setting
      operations: [read, list]
      fields:
        - {name: key, type: string, required: true}
    - name: Node
      fields:
        - {name: parent_id, type: ref, to: Node, required: true}
    - name: Tag
      fields:
        - {name: code, type: string, required: true, format: uuid, max_length: 10}
"""

# A compact, table-driven service honouring the contract, independent of the suite's own rule code.
# FLAGS switch on deliberate bugs, to prove the suite notices them.
REFERENCE_APP = r'''
"""Reference service for the contract suite's own tests."""

import json
import re
from datetime import datetime, timezone

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

ENTITIES = json.loads(r"""__ENTITIES__""")
FLAGS = json.loads(r"""__FLAGS__""")

FORMATS = {
    "email": re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+"),
    "uri": re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+"),
    "uuid": re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"),
}
DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")
TYPES = {"string": (str,), "text": (str,), "datetime": (str,), "integer": (int,), "ref": (int,),
         "number": (int, float), "boolean": (bool,)}


def fail(status, detail):
    raise HTTPException(status_code=status, detail=detail)


def parse_datetime(v):
    if not DATETIME.fullmatch(v):
        return None
    try:
        return datetime.fromisoformat(v.upper().replace("Z", "+00:00"))
    except ValueError:
        return None


def check(f, v):
    t = f["type"]
    allowed = TYPES[t] + ((bool,) if FLAGS.get("bool_as_int") and t == "integer" else ())
    if type(v) not in allowed:
        return f"expected {t}"
    if t in ("string", "text"):
        if f["min_length"] is not None and len(v) < f["min_length"]:
            return "too short"
        if f["max_length"] is not None and len(v) > f["max_length"] and not FLAGS.get("ignore_max_length"):
            return "too long"
        if f["format"] and not FORMATS[f["format"]].fullmatch(v):
            return f"not a {f['format']}"
        if f["enum"] is not None and v not in f["enum"]:
            return "not in enum"
    if t in ("integer", "number"):
        if v != v or v in (float("inf"), float("-inf")):
            return "not finite"
        if f["minimum"] is not None and v < f["minimum"]:
            return "too small"
        if f["maximum"] is not None and v > f["maximum"]:
            return "too large"
    if t == "datetime" and parse_datetime(v) is None and not (FLAGS.get("naive_datetime") and "T" in v):
        return "not RFC 3339"
    return None


def create_app():
    app = FastAPI()
    db = {e["name"]: {} for e in ENTITIES}
    next_id = {e["name"]: 1 for e in ENTITIES}
    by_name = {e["name"]: e for e in ENTITIES}
    refs = [(e["name"], f["name"], f["to"], f["on_delete"] or "restrict")
            for e in ENTITIES for f in e["fields"] if f["type"] == "ref"]

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    def out(e, oid):
        obj = {"id": oid, **db[e["name"]][oid]}
        for f in e["fields"]:
            if f["type"] == "datetime" and obj[f["name"]] is not None:
                moment = parse_datetime(obj[f["name"]]) or datetime.fromisoformat(obj[f["name"]])
                obj[f["name"]] = moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        return obj

    async def read_body(request):
        try:
            data = json.loads(await request.body())
        except ValueError:
            fail(422, "body is not JSON")
        if not isinstance(data, dict):
            fail(422, "body must be a JSON object")
        return data

    def validate(e, data, oid):
        fields = {f["name"]: f for f in e["fields"]}
        unknown = [k for k in data if k not in fields]
        if unknown and not FLAGS.get("keep_unknown"):
            fail(422, f"unknown fields {unknown}")
        data = {k: v for k, v in data.items() if k in fields}
        for name, f in fields.items():
            if name not in data:
                if oid is None and f["required"]:
                    fail(422, f"{name} is required")
                continue
            v = data[name]
            if v is None:
                if f["required"]:
                    fail(422, f"{name} is required")
                continue
            problem = check(f, v)
            if problem:
                fail(422, f"{name}: {problem}")
            if f["type"] == "ref" and v not in db[f["to"]]:
                fail(422, f"{name}: no {f['to']} {v}")
        for name, f in fields.items():
            v = data.get(name)
            if f["unique"] and v is not None and not FLAGS.get("no_unique"):
                if any(o[name] == v for i, o in db[e["name"]].items() if i != oid):
                    fail(409, f"{name} {v!r} is taken")
        return data

    def add_routes(e):
        name, path, ops = e["name"], "/" + e["collection"], e["operations"]
        store = db[name]

        def get_or_404(oid):
            if oid not in store:
                fail(404, f"no {name} {oid}")
            return store[oid]

        if "create" in ops:
            @app.post(path)
            async def create(request: Request):
                data = validate(e, await read_body(request), None)
                obj = {}
                for f in e["fields"]:
                    default = None if FLAGS.get("no_defaults") else f["default"]
                    obj[f["name"]] = data.get(f["name"], default)
                oid = next_id[name]
                next_id[name] += 1
                store[oid] = obj
                return JSONResponse(out(e, oid), status_code=FLAGS.get("create_status", 201))

        if "read" in ops:
            @app.get(path + "/{oid}")
            def read(oid: int):
                get_or_404(oid)
                return out(e, oid)

        if "update" in ops:
            @app.patch(path + "/{oid}")
            async def update(oid: int, request: Request):
                obj = get_or_404(oid)
                data = validate(e, await read_body(request), oid)
                if FLAGS.get("patch_replaces"):
                    obj.update({f["name"]: None for f in e["fields"] if not f["required"]})
                obj.update(data)
                return out(e, oid)

        if "delete" in ops:
            @app.delete(path + "/{oid}")
            def delete(oid: int):
                get_or_404(oid)
                doomed, todo = set(), [(name, oid)]
                while todo:
                    key = todo.pop()
                    if key in doomed:
                        continue
                    doomed.add(key)
                    for child, field, parent, rule in refs:
                        if parent == key[0] and (rule == "cascade" and not FLAGS.get("no_cascade")):
                            todo += [(child, i) for i, o in db[child].items() if o[field] == key[1]]
                for child, field, parent, rule in refs:
                    if rule == "restrict" and not FLAGS.get("no_restrict"):
                        for i, o in db[child].items():
                            if (parent, o[field]) in doomed and (child, i) not in doomed:
                                fail(409, f"{child} {i} refers to {parent} {o[field]}")
                for ent, i in doomed:
                    db[ent].pop(i, None)
                return Response(status_code=204)

        if "list" in ops:
            @app.get(path)
            def list_(request: Request):
                params = request.query_params
                limit, offset = params.get("limit", str(FLAGS.get("default_limit", 50))), params.get("offset", "0")
                if not re.fullmatch(r"[0-9]+", limit) or not re.fullmatch(r"[0-9]+", offset):
                    fail(422, "limit and offset are non-negative integers")
                limit, offset = int(limit), int(offset)
                if not 1 <= limit <= 500:
                    fail(422, "limit is 1..500")
                ids = sorted(store, reverse=bool(FLAGS.get("list_desc")))
                return {"items": [out(e, i) for i in ids[offset:offset + limit]], "total": len(ids)}

    for e in ENTITIES:
        add_routes(e)
    return app
'''

SMOKE_TEST = '''
"""The bundle's own test: the app starts."""
from fastapi.testclient import TestClient

from service.app import create_app


def test_health():
    assert TestClient(create_app()).get("/healthz").status_code == 200
'''


def reference_bundle(intent, flags: dict | None = None) -> dict[str, str]:
    entities = []
    for e in intent.spec.entities:
        data = e.model_dump(mode="json")
        data["collection"] = e.collection
        entities.append(data)
    app = REFERENCE_APP.replace("__ENTITIES__", json.dumps(entities)).replace("__FLAGS__", json.dumps(flags or {}))
    return {"service/__init__.py": "", "service/app.py": app, "tests/test_service_smoke.py": SMOKE_TEST}


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_suite(tmp: Path, bundle: dict[str, str], intent, targets: list[str] | None = None) -> dict[str, str]:
    """Runs the suite next to the bundle in the sandbox; test name -> passed/failed/skipped."""
    work = write(tmp / "bundle", {**bundle, **render_contract_suite(intent)})
    sandbox = SubprocessSandbox(tmp, timeout_s=120)
    targets = targets or ["tests", "contract_tests"]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "--junitxml=report.xml"]
    result = sandbox.run(cmd, workdir=work)
    assert result.returncode in (0, 1), f"pytest did not run: {result.reason}\n{result.stdout}\n{result.stderr}"
    outcomes = junit_outcomes(work / "report.xml")
    outcomes["__output__"] = result.stdout
    return outcomes


def failures(outcomes: dict[str, str]) -> list[str]:
    return sorted(k for k, v in outcomes.items() if v == "failed")


@pytest.fixture(scope="module")
def rich():
    return parse_intent_text(RICH)


# ------------------------------------------------------------------------------------ rendering


def test_render_is_deterministic_and_self_contained(rich) -> None:
    files = render_contract_suite(rich)
    assert files == render_contract_suite(parse_intent_text(RICH))
    assert sorted(files) == ["contract_tests/codemind_service.py", "contract_tests/contract_support.py",
                             "contract_tests/intent.json", "contract_tests/test_contract_api.py"]
    assert json.loads(files["contract_tests/intent.json"]) == rich.canonical()
    for path, text in files.items():
        name = Path(path).name
        assert name.startswith("test_contract") or name in ("codemind_service.py", "contract_support.py", "intent.json")
        assert not re.search(r"^\s*(import|from)\s+codemind_dagster", text, re.MULTILINE), path
        if path.endswith(".py"):
            compile(text, path, "exec")


@pytest.fixture(scope="module")
def reference_outcomes(tmp_path_factory, rich) -> dict[str, str]:
    return run_suite(tmp_path_factory.mktemp("reference"), reference_bundle(rich), rich)


def test_suite_collects_readable_ids(reference_outcomes) -> None:
    for ident in ["test_healthz", "test_create[Customer]", "test_rejects[Customer.email-format]",
                  "test_rejects[Customer.points-type-bool]", "test_rejects[Order.customer_id-ref-missing]",
                  "test_unique[Invoice.order_id]", "test_delete_restrict[AuditEntry.customer_id]",
                  "test_delete_cascade[Order.customer_id]",
                  "test_delete_cascade_blocked_by_restrict[Order.customer_id>Invoice.order_id]",
                  "test_delete_cascade_recursive[Category.parent_id>Category.parent_id]",
                  "test_removed_operation[AuditEntry-update]", "test_list_rejects[Customer-limit=0]",
                  "test_rejects_body[Customer-id-in-body]"]:
        assert ident in reference_outcomes, f"{ident} not collected"


# ---------------------------------------------------------------- the rules agree with the intent model


PROBES = [
    None, True, False, 0, 1, -1, 5, 1.0, 1.5, -0.5, 10**20, "", "a", "ab", "abc", "x" * 61, "bronze", "gold",
    "platinum", "a@b.c", "user@example", "a@b.c\n", "user@@x.io", "https://example.com/x", "h://x",
    "example.com/x", "ftp://a b", "00000000-0000-4000-8000-000000000000", "0000000g-0000-4000-8000-000000000000",
    "2024-05-06T07:08:09Z", "2024-05-06t07:08:09z", "2024-05-06 07:08:09+02:00", "2024-05-06T07:08:09",
    "2024-02-30T07:08:09Z", "2024-05-06T07:08:09.123456789+05:30", "2024-05-06", [], {}, ["x"],
]


def all_fields(intent) -> list[FieldSpec]:
    extra = [
        FieldSpec(name="u", type="string", format="uuid"),
        FieldSpec(name="n", type="number", minimum=0.5, maximum=0.75),
        FieldSpec(name="i", type="integer", minimum=-3, maximum=-3),
        FieldSpec(name="e", type="string", format="email", min_length=30),
        FieldSpec(name="s", type="string", min_length=1, max_length=1, unique=True),
        FieldSpec(name="r", type="string", format="uri", max_length=6),
        FieldSpec(name="b", type="boolean", unique=True, default=False),
        FieldSpec(name="t", type="string", min_length=40, enum=["x" * 40, "y" * 41]),
        FieldSpec(name="x", type="text", min_length=3, max_length=3, required=True, default="abc"),
    ]
    return [f for e in intent.spec.entities for f in e.fields] + extra


def as_support(f: FieldSpec) -> support.Field:
    data = f.model_dump()
    data["enum"] = tuple(data["enum"]) if data["enum"] is not None else None
    return support.Field(**data)


def test_check_value_agrees_with_the_intent_model(rich) -> None:
    for f in all_fields(rich):
        for v in PROBES:
            assert support.check_value(as_support(f), v) == intent_mod.check_value(f, v), (f.name, v)


def test_plural_agrees_with_the_intent_model() -> None:
    for name in ["Customer", "PointsTransaction", "Category", "Address", "Box", "Buzz", "Match", "Wish", "Day",
                 "HTTPRequest", "A", "Y", "Policy", "Key", "Status", "APIKey"]:
        assert support.default_plural(name) == intent_mod.default_plural(name), name


def test_valid_values_are_valid_and_distinct(rich) -> None:
    for f in all_fields(rich):
        if f.type == "ref":
            continue
        sf = as_support(f)
        values = [support.valid_value(sf, i) for i in range(60)]
        real = [v for v in values if v is not None]
        assert real, f"no valid value for {f.name}"
        for v in real:
            assert intent_mod.check_value(f, v) is None, (f.name, v)
        assert len({json.dumps(v) for v in real}) == len(real), (f.name, real)


def test_invalid_values_break_the_rules(rich) -> None:
    for f in all_fields(rich):
        cases = support.invalid_values(as_support(f))
        names = {c.case for c in cases}
        for rule in ("min_length", "max_length", "format", "enum", "minimum", "maximum"):
            if getattr(f, rule):  # a min_length of 0 is no rule
                assert rule in names, (f.name, rule)
        assert ("missing" in names) == (f.required and f.default is None)
        for c in cases:
            if c.case not in ("missing", "null", "ref-missing"):
                assert intent_mod.check_value(f, c.value) is not None, (f.name, c)
    # The length cases break exactly one rule: the value is otherwise a valid email.
    email = as_support(FieldSpec(name="e", type="string", format="email", min_length=30, max_length=40))
    for c in support.invalid_values(email):
        if c.case in ("min_length", "max_length"):
            assert support.check_value(support.Field(name="e", type="string", format="email"), c.value) is None


def test_impossible_entities_are_recognised() -> None:
    model = support.Model.from_intent(parse_intent_text(IMPOSSIBLE).canonical())
    assert model.why_not_creatable("Setting") == "Setting has no create operation"
    assert "cycle" in model.why_not_creatable("Node")
    assert "required field Tag.code" in model.why_not_creatable("Tag")


# ------------------------------------------------------------------------------- against real code


def test_suite_passes_on_the_reference_bundle(reference_outcomes) -> None:
    outcomes = reference_outcomes
    assert not failures(outcomes), outcomes["__output__"][-6000:]
    passed = [k for k, v in outcomes.items() if v == "passed"]
    assert len(passed) > 150
    assert outcomes["test_health"] == "passed"  # the bundle's own tests ran too
    # AuditEntry has no update: its update cases are not made up.
    assert outcomes["test_update[AuditEntry]"] == "skipped"


def test_impossible_intent_skips_with_reasons(tmp_path) -> None:
    intent = parse_intent_text(IMPOSSIBLE)
    outcomes = run_suite(tmp_path, reference_bundle(intent), intent)
    assert not failures(outcomes), outcomes["__output__"][-6000:]
    assert outcomes["test_create[Setting]"] == "skipped"
    assert outcomes["test_create[Node]"] == "skipped"
    assert outcomes["test_list[Setting]"] == "skipped"  # the empty list is checked, then it stops
    assert outcomes["test_read_missing[Setting]"] == "passed"
    assert outcomes["test_removed_operation[Setting-create]"] == "passed"


# Deliberate bug -> tests that must catch it.
BROKEN = {
    "create_status": (200, ["test_create[Customer]", "test_create_applies_defaults[Order]"]),
    "ignore_max_length": (True, ["test_rejects[Customer.name-max_length]", "test_rejects[Customer.notes-max_length]"]),
    "bool_as_int": (True, ["test_rejects[Customer.points-type-bool]"]),
    "no_cascade": (True, ["test_delete_cascade[Order.customer_id]",
                          "test_delete_cascade_recursive[Category.parent_id>Category.parent_id]"]),
    "no_restrict": (True, ["test_delete_restrict[AuditEntry.customer_id]",
                           "test_delete_cascade_blocked_by_restrict[Order.customer_id>Invoice.order_id]"]),
    "no_unique": (True, ["test_unique[Customer.email]", "test_unique[Invoice.order_id]"]),
    "default_limit": (100, ["test_list_default_limit[Customer]"]),
    "keep_unknown": (True, ["test_rejects_body[Customer-unknown-field]", "test_rejects_body[Order-id-in-body]"]),
    "no_defaults": (True, ["test_create_applies_defaults[Customer]"]),
    "naive_datetime": (True, ["test_rejects[Customer.born_at-datetime-no-offset]"]),
    "list_desc": (True, ["test_list[Customer]", "test_list_paging[Order]"]),
    "patch_replaces": (True, ["test_update[Customer]"]),
}


# One process for all the bugs: pytest starts once and the reference app reads FLAGS on every request.
BROKEN_DRIVER = """
import json
import sys

import pytest

import service.app

for flag, value, ids in json.load(open("plan.json")):
    service.app.FLAGS.clear()
    service.app.FLAGS[flag] = value
    targets = [f"contract_tests/test_contract_api.py::{ident}" for ident in ids]
    pytest.main(["-q", "-p", "no:cacheprovider", f"--junitxml=report-{flag}.xml", *targets])
"""


def junit_outcomes(path: Path) -> dict[str, str]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[case.get("name")] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return outcomes


def test_suite_fails_on_broken_bundles(tmp_path, rich) -> None:
    plan = [[flag, value, ids] for flag, (value, ids) in BROKEN.items()]
    files = {**reference_bundle(rich), **render_contract_suite(rich), "drive.py": BROKEN_DRIVER,
             "plan.json": json.dumps(plan)}
    work = write(tmp_path / "broken", files)
    result = SubprocessSandbox(tmp_path, timeout_s=120).run([sys.executable, "drive.py"], workdir=work)
    assert result.returncode == 0, result.stdout + result.stderr
    for flag, (_, expected) in BROKEN.items():
        outcomes = junit_outcomes(work / f"report-{flag}.xml")
        for ident in expected:
            assert outcomes.get(ident) == "failed", f"bug {flag!r} went unnoticed by {ident}: {outcomes.get(ident)}"


# --------------------------------------------------------------------------- the offline generator


def example_intents() -> list:
    found = [pytest.param(RICH, id="contract-demo")]
    for path in sorted((REPO / "examples" / "intents").glob("*.y*ml")):
        found.append(pytest.param(path.read_text(), id=path.stem))
    return found


@pytest.mark.parametrize("text", example_intents())
def test_suite_passes_on_the_offline_generator(tmp_path, text) -> None:
    codegen = pytest.importorskip("codemind_dagster.agents.offline.service_codegen")
    intent = parse_intent_text(text)
    # Only the contract suite: the generator's own tests are its author's to keep green.
    outcomes = run_suite(tmp_path, codegen.render_service(intent), intent, ["contract_tests"])
    assert not failures(outcomes), textwrap.shorten(str(failures(outcomes)), 2000) + outcomes["__output__"][-8000:]
