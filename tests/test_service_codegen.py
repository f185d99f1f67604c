"""The offline service generator: bundles pass their own tests with coverage, scan clean and behave per spec v1."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.domain.intent import Intent, parse_intent_text

HEAD = """apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata:
  name: {name}
spec:
  summary: {summary}
  entities:
"""
INTENTS = {
    # Every field type and rule; both on_delete modes; self-references; a custom plural; operation subsets.
    "all-rules": HEAD.format(name="all-rules", summary="Every field type and rule of spec v1.") + """
    - name: Account
      fields:
        - {name: email, type: string, required: true, unique: true, format: email, max_length: 254}
        - {name: homepage, type: string, format: uri, min_length: 10, max_length: 200}
        - {name: token, type: string, unique: true, format: uuid}
        - {name: handle, type: string, required: true, min_length: 3, max_length: 16}
        - {name: tier, type: string, enum: [bronze, silver, gold], default: bronze}
        - {name: bio, type: text, max_length: 500}
        - {name: level, type: integer, minimum: 1, maximum: 10, default: 1}
        - {name: balance, type: number, minimum: -100.5, maximum: 1000000, default: 0}
        - {name: active, type: boolean, default: true}
        - {name: born_at, type: datetime}
    - name: Category
      plural: category_tree
      fields:
        - {name: title, type: string, required: true, unique: true}
        - {name: parent_id, type: ref, to: Category, on_delete: cascade}
        - {name: guardian_id, type: ref, to: Category, on_delete: restrict}
    - name: Post
      fields:
        - {name: account_id, type: ref, to: Account, required: true, on_delete: cascade}
        - {name: category_id, type: ref, to: Category}
        - {name: score, type: number}
        - {name: views, type: integer}
        - {name: published, type: boolean, required: true}
        - {name: published_at, type: datetime, required: true}
    - name: Comment
      fields:
        - {name: post_id, type: ref, to: Post, required: true, on_delete: cascade}
        - {name: body, type: text, required: true, min_length: 1}
      operations: [create, read, list, delete]
    - name: Pin
      fields:
        - {name: post_id, type: ref, to: Post, required: true, unique: true, on_delete: restrict}
      operations: [create, read, delete]
""",
    # SQL and Python keywords as names, a plural SQLite reserves, a plural that is a keyword, no create.
    "sql-keywords": HEAD.format(name="sql-keywords", summary="Names that are SQL and Python keywords.") + """
    - name: Order
      fields:
        - {name: from, type: string, required: true}
        - {name: select, type: integer, unique: true}
        - {name: class, type: text}
        - {name: type, type: string, enum: [a, b]}
        - {name: global, type: boolean}
        - {name: where, type: datetime}
        - {name: rowid, type: number}
        - {name: group, type: ref, to: Group, on_delete: cascade}
    - name: Group
      plural: sqlite_groups
      fields:
        - {name: table, type: string, required: true, unique: true}
        - {name: import, type: ref, to: Group}
      operations: [read, list, update, delete]
    - name: User
      plural: select
      fields:
        - {name: def, type: string}
        - {name: order, type: ref, to: Order, required: true, on_delete: restrict}
      operations: [create, list]
""",
    # Rules that allow only one or two objects, and entities no request can ever create.
    "tight-rules": HEAD.format(name="tight-rules", summary="Few distinct objects, and some none at all.") + """
    - name: Flag
      fields:
        - {name: lit, type: boolean, required: true, unique: true}
        - {name: colour, type: string, enum: [red, green], unique: true}
        - {name: rank, type: integer, minimum: 7, maximum: 7, unique: true}
    - name: Egg
      fields:
        - {name: chicken_id, type: ref, to: Chicken, required: true}
    - name: Chicken
      fields:
        - {name: egg_id, type: ref, to: Egg, required: true}
    - name: Ouroboros
      fields:
        - {name: tail_id, type: ref, to: Ouroboros, required: true}
    - name: Tiny
      fields:
        - {name: code, type: string, required: true, unique: true, max_length: 1}
        - {name: mail, type: string, format: email, max_length: 5}
        - {name: ratio, type: number, minimum: 0.5, maximum: 0.5, unique: true}
        - {name: flag_id, type: ref, to: Flag, on_delete: cascade}
""",
    # Nothing can be created over HTTP at all: the tests seed objects through the store.
    "read-only": HEAD.format(name="read-only", summary="A catalogue published by another system.") + """
    - name: Entry
      fields:
        - {name: title, type: string, required: true}
      operations: [read, list]
""",
    # No required, unique or ref fields: the generated code leaves those paths out.
    "minimal": HEAD.format(name="minimal", summary="One kind of note.") + """
    - name: Note
      fields:
        - {name: text, type: text}
""",
}


def intent(name: str) -> Intent:
    return parse_intent_text(INTENTS[name], f"{name}.yaml")


def write_bundle(name: str, root: Path) -> Path:
    for rel, text in render_service(intent(name)).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def child_env(**extra: str) -> dict[str, str]:
    """This environment without what would leak into a bundle's run (coverage, pytest, CodeMind settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "PYTEST_", "CODEMIND_"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **extra}


# ------------------------------------------------------------------------------------------ bundles


def test_bundle_layout_and_independence() -> None:
    files = render_service(intent("all-rules"))
    assert {"service/__init__.py", "service/app.py"} <= set(files)
    tests = [Path(p) for p in files if p.startswith("tests/")]
    assert all(p.name.startswith("test_service_") or p.name == "service_testkit.py" for p in tests)
    assert not [p for p in tests if p.name in ("__init__.py", "conftest.py") or p.name.startswith("test_contract")]
    assert len({p.name for p in tests}) == len(tests)  # unique basenames: pytest inserts rootdirs
    for path, text in files.items():
        assert not Path(path).is_absolute() and ".." not in Path(path).parts
        assert not re.search(r"^\s*(from|import) codemind_dagster", text, re.MULTILINE), path
        if path.endswith(".py"):
            compile(text, path, "exec")
    assert json.loads(files["service/openapi.json"])["openapi"] == "3.1.0"


def test_render_is_deterministic() -> None:
    for name in INTENTS:
        assert render_service(intent(name)) == render_service(intent(name))
    # Also across processes with different hash seeds (set iteration order).
    code = ("import json, sys; from codemind_dagster.agents.offline.service_codegen import render_service; "
            "from codemind_dagster.domain.intent import parse_intent_text; "
            "print(json.dumps(render_service(parse_intent_text(sys.stdin.read()))))")
    outputs = {
        subprocess.run([sys.executable, "-c", code], input=INTENTS["all-rules"], env=child_env(PYTHONHASHSEED=seed),
                       capture_output=True, text=True, check=True, timeout=120).stdout
        for seed in ("1", "2")
    }
    assert outputs == {json.dumps(render_service(intent("all-rules"))) + "\n"}


@pytest.mark.parametrize("name", sorted(INTENTS))
def test_bundle_passes_its_own_tests_with_coverage(name: str, tmp_path: Path) -> None:
    bundle = write_bundle(name, tmp_path / "bundle")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "coverage", "run", "--source=service", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests"],
        cwd=bundle, env=child_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", "coverage.json"], cwd=bundle,
                   env=child_env(), check=True, timeout=120)
    totals = json.loads((bundle / "coverage.json").read_text())["totals"]
    print(f"{name}: {run.stdout.strip().splitlines()[-1]}; coverage {totals['percent_covered']:.1f}%; {seconds:.1f}s")
    assert totals["percent_covered"] >= 90, totals
    assert seconds < 120  # a few seconds normally; this only catches a runaway suite


@pytest.mark.parametrize("name", sorted(INTENTS))
def test_bandit_finds_nothing_high_or_medium(name: str, tmp_path: Path) -> None:
    bundle = write_bundle(name, tmp_path / "bundle")
    run = subprocess.run([sys.executable, "-m", "bandit", "-r", "service", "-f", "json", "-q"], cwd=bundle,
                         env=child_env(), capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(run.stdout)  # bandit exits 1 when it reports anything, LOW included
    assert report["results"] == [] or all(r["issue_severity"] == "LOW" for r in report["results"]), report["results"]
    assert not report["errors"], report["errors"]


def _schema_hash(name_or_text: str) -> str:
    text = INTENTS.get(name_or_text, name_or_text)
    model = render_service(parse_intent_text(text))["service/model.py"]
    found = re.search(r'^SCHEMA_HASH = "([0-9a-f]{12})"$', model, re.MULTILINE)
    assert found, "model.py names its schema hash"
    return found.group(1)


def test_schema_hash_follows_the_storage_layout_only() -> None:
    base = INTENTS["minimal"]
    assert _schema_hash(base) != _schema_hash("all-rules")
    # A new rule on an existing column keeps the data file; a new or retyped column starts a fresh one.
    assert _schema_hash(base.replace("type: text}", "type: text, max_length: 9}")) == _schema_hash(base)
    assert _schema_hash(base.replace("type: text}", "type: string}")) != _schema_hash(base)
    assert _schema_hash(base + "        - {name: more, type: text}\n") != _schema_hash(base)


# -------------------------------------------------------------------------- behaviour, in process


def _forget_service() -> None:
    for module in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
        del sys.modules[module]


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Renders an intent into tmp_path and imports its service.app; forgets the package afterwards."""
    monkeypatch.delenv("CODEMIND_DATA_DIR", raising=False)

    def loader(name: str) -> ModuleType:
        bundle = write_bundle(name, tmp_path / name)
        _forget_service()
        monkeypatch.syspath_prepend(str(bundle))
        return importlib.import_module("service.app")

    yield loader
    _forget_service()


def _created(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_strict_numbers_and_json(load: Callable[[str], ModuleType]) -> None:
    client = TestClient(load("all-rules").create_app())
    account = {"email": "a@example.com", "handle": "abc"}
    for level in (1.0, True, "1", 0, 11):
        response = client.post("/accounts", json={**account, "level": level})
        assert response.status_code == 422 and response.json()["detail"], level
    made = _created(client, "/accounts", {**account, "level": 10, "balance": 5})
    assert made["level"] == 10 and type(made["balance"]) is int and made["tier"] == "bronze" and made["active"] is True
    post = {"account_id": made["id"], "published": False, "published_at": "2024-05-06T07:08:09+02:00"}
    assert client.post("/posts", json={**post, "views": 2**63}).status_code == 422  # beyond SQLite's integers
    assert client.post("/posts", json={**post, "views": 2**63 - 1}).json()["views"] == 2**63 - 1
    assert client.post("/posts", json={**post, "score": 1.0}).json()["score"] == 1.0
    headers = {"content-type": "application/json"}
    for raw in (b'{"email": ', b'{"score": NaN}', b'{"score": 1e999}', b'{"a": "\\ud800"}', b"[1]"):
        response = client.post("/posts", content=raw, headers=headers)
        assert response.status_code == 422 and "detail" in response.json(), raw


def test_unique_values(load: Callable[[str], ModuleType]) -> None:
    client = TestClient(load("all-rules").create_app())
    a = _created(client, "/accounts", {"email": "a@example.com", "handle": "aaa"})
    b = _created(client, "/accounts", {"email": "b@example.com", "handle": "bbb"})
    assert client.post("/accounts", json={"email": "a@example.com", "handle": "ccc"}).status_code == 409
    # Invalid input is reported before the conflict.
    assert client.post("/accounts", json={"email": "a@example.com", "handle": "c"}).status_code == 422
    assert client.patch(f"/accounts/{b['id']}", json={"email": "a@example.com"}).status_code == 409
    assert client.patch(f"/accounts/{a['id']}", json={"email": "a@example.com"}).json() == a
    assert a["token"] is None and b["token"] is None  # null is no value: not a duplicate


def test_cascade_and_restrict(load: Callable[[str], ModuleType]) -> None:
    client = TestClient(load("all-rules").create_app())
    account = _created(client, "/accounts", {"email": "a@example.com", "handle": "aaa"})
    post = _created(client, "/posts", {"account_id": account["id"], "published": True,
                                       "published_at": "2024-01-01T00:00:00Z"})
    comment = _created(client, "/comments", {"post_id": post["id"], "body": "hi"})
    pin = _created(client, "/pins", {"post_id": post["id"]})
    # The cascade would delete the post, which the pin holds with restrict: nothing is deleted.
    response = client.delete(f"/accounts/{account['id']}")
    assert response.status_code == 409 and "Pin" in response.json()["detail"]
    for path in (f"/accounts/{account['id']}", f"/posts/{post['id']}", f"/comments/{comment['id']}"):
        assert client.get(path).status_code == 200
    assert client.delete(f"/pins/{pin['id']}").status_code == 204
    response = client.delete(f"/accounts/{account['id']}")
    assert response.status_code == 204 and response.content == b""
    for path in (f"/accounts/{account['id']}", f"/posts/{post['id']}", f"/comments/{comment['id']}"):
        assert client.get(path).status_code == 404


def test_self_references(load: Callable[[str], ModuleType]) -> None:
    client = TestClient(load("all-rules").create_app())

    def category(title: str, **refs: int) -> int:
        return _created(client, "/category_tree", {"title": title, **refs})["id"]

    root = category("root")
    child = category("child", parent_id=root)
    grandchild = category("grandchild", parent_id=child)
    held = category("held", guardian_id=grandchild)
    assert client.delete(f"/category_tree/{root}").status_code == 409  # held guards the grandchild
    assert client.patch(f"/category_tree/{held}", json={"guardian_id": None}).status_code == 200
    assert client.delete(f"/category_tree/{root}").status_code == 204
    assert [c["id"] for c in client.get("/category_tree").json()["items"]] == [held]
    # A restrict reference held by an object the same delete removes does not block it.
    top = category("top")
    category("both", parent_id=top, guardian_id=top)
    assert client.delete(f"/category_tree/{top}").status_code == 204
    loop = category("loop")
    assert client.patch(f"/category_tree/{loop}", json={"guardian_id": loop}).status_code == 200
    assert client.delete(f"/category_tree/{loop}").status_code == 204
    assert client.get("/category_tree").json() == {"items": [client.get(f"/category_tree/{held}").json()], "total": 1}


def test_keyword_names_and_removed_operations(load: Callable[[str], ModuleType]) -> None:
    app = load("sql-keywords").create_app()
    client = TestClient(app)
    order = {"from": "x", "select": 1, "class": "c", "type": "a", "global": True, "where": "2024-01-01 10:00:00Z",
             "rowid": 1.5}
    made = _created(client, "/orders", order)
    assert made == {"id": made["id"], **order, "group": None}
    assert client.patch(f"/orders/{made['id']}", json={"select": 2, "global": False}).json()["global"] is False
    # Group has no create operation; an object can still exist (here put in place through the store).
    assert client.post("/sqlite_groups", json={"table": "t"}).status_code == 405
    group = app.state.store.create("Group", {"table": "t"})
    assert client.patch(f"/orders/{made['id']}", json={"group": group["id"]}).status_code == 200
    assert client.patch(f"/sqlite_groups/{group['id']}", json={"import": group["id"]}).status_code == 200
    user = _created(client, "/select", {"order": made["id"], "def": "d"})
    assert client.get(f"/select/{user['id']}").status_code == 405
    assert client.delete(f"/select/{user['id']}").status_code == 405
    assert client.get("/select?limit=500").json() == {"items": [user], "total": 1}
    assert client.delete(f"/orders/{made['id']}").status_code == 409  # the user holds the order (restrict)
    for query in ("limit=0", "limit=501", "limit=x", "offset=-1", "offset=1.5"):
        response = client.get(f"/select?{query}")
        assert response.status_code == 422 and "detail" in response.json(), query


def test_writes_from_many_threads(load: Callable[[str], ModuleType]) -> None:
    store = load("all-rules").create_app().state.store

    def create(i: int) -> int:
        try:
            return store.create("Account", {"email": f"u{i % 10}@example.com", "handle": f"user{i}"})["id"]
        except Exception as error:  # noqa: BLE001 - the 409s are the point
            return -getattr(error, "status", 0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(create, range(40)))
    ids = [r for r in results if r > 0]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 10  # one winner per email
    assert sorted(r for r in results if r <= 0) == [-409] * 30


def test_data_dir_keeps_objects_per_schema(load: Callable[[str], ModuleType], tmp_path: Path) -> None:
    module = load("minimal")
    data = tmp_path / "data"
    made = _created(TestClient(module.create_app(str(data))), "/notes", {"text": "kept"})
    assert TestClient(module.create_app(str(data))).get(f"/notes/{made['id']}").json() == made
    assert [p.name for p in data.glob("*.sqlite3")] == [f"service-{_schema_hash('minimal')}.sqlite3"]
    assert TestClient(module.create_app()).get("/notes").json()["total"] == 0  # None: private memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_uvicorn_serves_a_bundle(tmp_path: Path) -> None:
    bundle = write_bundle("minimal", tmp_path / "bundle")
    port = _free_port()
    env = child_env(CODEMIND_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=bundle, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not come up"
                time.sleep(0.2)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        made = httpx.post(f"{url}/notes", json={"text": "hello"}, timeout=5)
        assert made.status_code == 201
        assert httpx.get(f"{url}/notes/{made.json()['id']}", timeout=5).json() == made.json()
        assert list((tmp_path / "data").glob("service-*.sqlite3"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
