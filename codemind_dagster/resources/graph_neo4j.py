"""The business-model graph in Neo4j: one subgraph per intent, upserted in one transaction."""

from __future__ import annotations

import contextlib
from typing import Any, Self

import dagster as dg
from pydantic import PrivateAttr

from codemind_dagster.domain.business_model import BusinessModel, Edge, Node
from codemind_dagster.resources.backends import display_url
from codemind_dagster.resources.graph import impact_rows

SCHEMA = (
    "CREATE CONSTRAINT codemind_intent_name IF NOT EXISTS FOR (i:Intent) REQUIRE i.name IS UNIQUE",
    "CREATE CONSTRAINT codemind_entity_key IF NOT EXISTS FOR (e:Entity) REQUIRE (e.intent, e.name) IS UNIQUE",
    ("CREATE CONSTRAINT codemind_field_key IF NOT EXISTS "
     "FOR (f:Field) REQUIRE (f.intent, f.entity, f.name) IS UNIQUE"),
    # impact() looks entities up by name across intents.
    "CREATE INDEX codemind_entity_name IF NOT EXISTS FOR (e:Entity) ON (e.name)",
)
# Stale parts go first, so a changed intent keeps the nodes it still has (same element ids).
DELETE_STALE = (
    ("MATCH (s:Entity {intent: $intent})-[r:REFERENCES]->(d:Entity) "
     "WHERE NOT [s.name, d.name, r.field] IN $ref_keys DELETE r"),
    "MATCH (f:Field {intent: $intent}) WHERE NOT [f.entity, f.name] IN $field_keys DETACH DELETE f",
    "MATCH (e:Entity {intent: $intent}) WHERE NOT e.name IN $entity_names DETACH DELETE e",
)
UPSERT = (
    ("MERGE (i:Intent {name: $intent}) SET i.version = $version "
     "WITH i UNWIND $entities AS ent "
     "MERGE (e:Entity {intent: $intent, name: ent.name}) SET e = ent.props MERGE (i)-[:DEFINES]->(e)"),
    ("UNWIND $fields AS fld MATCH (e:Entity {intent: $intent, name: fld.entity}) "
     "MERGE (f:Field {intent: $intent, entity: fld.entity, name: fld.name}) SET f = fld.props "
     "MERGE (e)-[:HAS_FIELD]->(f)"),
    ("UNWIND $refs AS ref "
     "MATCH (s:Entity {intent: $intent, name: ref.src}), (d:Entity {intent: $intent, name: ref.dst}) "
     "MERGE (s)-[r:REFERENCES {field: ref.field}]->(d) SET r = ref.props"),
)
DROP_INTENT = (
    "MATCH (f:Field {intent: $intent}) DETACH DELETE f",
    "MATCH (e:Entity {intent: $intent}) DETACH DELETE e",
    "MATCH (i:Intent {name: $intent}) DETACH DELETE i",
)
READ_ENTITIES = """
MATCH (i:Intent {name: $intent})
OPTIONAL MATCH (i)-[:DEFINES]->(e:Entity)
OPTIONAL MATCH (e)-[:HAS_FIELD]->(f:Field)
WITH i, e, f ORDER BY f.position
WITH i, e, collect(f {.*}) AS fields ORDER BY e.name
RETURN i.version AS version, e {.*} AS entity, fields
"""
READ_REFERENCES = """
MATCH (:Intent {name: $intent})-[:DEFINES]->(s:Entity)-[r:REFERENCES]->(d:Entity)
RETURN s.name AS src, d.name AS dst, r {.*} AS props ORDER BY src, dst, r.field
"""
IMPACT = """
MATCH (i:Intent)-[:DEFINES]->(e:Entity {name: $name})
RETURN i.name AS intent, e.name AS entity, 'defines' AS relation, null AS field
UNION ALL
MATCH (i:Intent)-[:DEFINES]->(s:Entity)-[r:REFERENCES]->(:Entity {name: $name})
RETURN i.name AS intent, s.name AS entity, 'references' AS relation, r.field AS field
"""
ENTITY_KEYS = ("intent", "name")
FIELD_KEYS = ("intent", "entity", "position")
_SCHEMA_READY: set[tuple[str, str | None]] = set()


class GraphStoreError(RuntimeError):
    """The graph database cannot be reached, refused the credentials, or refused the request."""


def _storable(v: Any) -> bool:
    """A Neo4j property value: a primitive, or a list of primitives of one type."""
    if isinstance(v, (str, bool, int, float)):
        return True
    if not isinstance(v, list):
        return False
    return all(isinstance(x, (str, bool, int, float)) for x in v) and len({type(x) for x in v}) <= 1


def _check_props(props: dict[str, Any], reserved: tuple[str, ...], where: str) -> None:
    for k, v in props.items():
        if k in reserved:
            raise ValueError(f"{where}: property {k!r} is reserved by the Neo4j graph store")
        if not _storable(v):
            raise ValueError(f"{where}: property {k!r} = {v!r} is not a Neo4j property value "
                             "(a string, number, boolean or a list of one of them)")


def graph_params(model: BusinessModel) -> dict[str, Any]:
    """The write's query parameters, after checking the model fits the graph schema (nothing is written if not)."""
    entities, fields, refs = [], [], []
    names = {n.key for n in model.nodes}
    for n in model.nodes:
        where = f"business model {model.intent!r}, node {n.key!r}"
        if n.kind != "Entity":
            raise ValueError(f"{where}: kind {n.kind!r} is not stored in Neo4j (only Entity)")
        props = {k: v for k, v in n.properties.items() if k != "fields"}
        if not isinstance(n.properties.get("fields"), list):
            raise TypeError(f"{where}: properties need a list of 'fields'")
        _check_props(props, ENTITY_KEYS, where)
        entities.append({"name": n.key, "props": {**props, "intent": model.intent, "name": n.key}})
        for pos, f in enumerate(n.properties["fields"]):
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise TypeError(f"{where}: fields[{pos}] needs a string 'name'")
            _check_props(f, FIELD_KEYS, f"{where}, field {f['name']!r}")
            fields.append({"entity": n.key, "name": f["name"],
                           "props": {**f, "intent": model.intent, "entity": n.key, "position": pos}})
    for e in model.edges:
        where = f"business model {model.intent!r}, edge {e.src}->{e.dst}"
        if e.kind != "REFERENCES":
            raise ValueError(f"{where}: kind {e.kind!r} is not stored in Neo4j (only REFERENCES)")
        if e.src not in names or e.dst not in names:
            raise ValueError(f"{where}: both ends must be entities of the model")
        if not isinstance(e.properties.get("field"), str):
            raise TypeError(f"{where}: properties need the referencing 'field'")
        _check_props(e.properties, (), where)
        refs.append({"src": e.src, "dst": e.dst, "field": e.properties["field"], "props": dict(e.properties)})
    return {"intent": model.intent, "version": model.version, "entities": entities, "fields": fields,
            "refs": refs, "entity_names": sorted(names), "field_keys": [[f["entity"], f["name"]] for f in fields],
            "ref_keys": [[r["src"], r["dst"], r["field"]] for r in refs]}


def _write_tx(tx, params: dict[str, Any]) -> None:
    queries = (*DELETE_STALE, *UPSERT) if params["entities"] else DROP_INTENT
    for q in queries:
        tx.run(q, params).consume()


def _read_tx(tx, intent: str) -> BusinessModel | None:
    rows = list(tx.run(READ_ENTITIES, intent=intent))
    if not rows:
        return None
    nodes = []
    for r in rows:
        if r["entity"] is None:
            continue
        props = {k: v for k, v in r["entity"].items() if k not in ENTITY_KEYS}
        props["fields"] = [{k: v for k, v in f.items() if k not in FIELD_KEYS} for f in r["fields"]]
        nodes.append(Node(key=r["entity"]["name"], kind="Entity", properties=props))
    edges = [Edge(src=r["src"], dst=r["dst"], kind="REFERENCES", properties=dict(r["props"]))
             for r in tx.run(READ_REFERENCES, intent=intent)]
    return BusinessModel(intent=intent, nodes=nodes, edges=edges, version=rows[0]["version"])


class Neo4jGraphStore:
    """(:Intent)-[:DEFINES]->(:Entity)-[:HAS_FIELD]->(:Field), (:Entity)-[:REFERENCES]->(:Entity)."""

    def __init__(self, url: str, user: str = "neo4j", password: str | None = None, database: str | None = None,
                 timeout_s: float = 10.0):
        self.url, self.user, self.database, self.timeout_s = url, user, database, timeout_s
        self._password = password
        self._drv = None

    def __repr__(self) -> str:
        return f"Neo4jGraphStore({display_url(self.url)!r}, user={self.user!r})"

    def _error(self, exc: Exception) -> GraphStoreError:
        """A clear message naming where and what, never the password."""
        from neo4j import exceptions as ne

        where = display_url(self.url)
        if isinstance(exc, ne.AuthError):
            how = "no password was given" if self._password is None else "wrong password or unknown user"
            return GraphStoreError(f"Neo4j at {where} refused user {self.user!r}: {how} "
                                   "(the password comes from CODEMIND_NEO4J_PASSWORD)")
        if isinstance(exc, ne.ServiceUnavailable):
            return GraphStoreError(f"Neo4j at {where} is not reachable: {exc}")
        if isinstance(exc, (ne.ConfigurationError, ValueError)):
            return GraphStoreError(f"Neo4j URL {where} is not usable: {exc}")
        if isinstance(exc, ne.Neo4jError):
            return GraphStoreError(f"Neo4j at {where} refused the request: {exc.code}: {exc.message}")
        return GraphStoreError(f"Neo4j at {where}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def _translated(self):
        """Driver and server errors as GraphStoreError."""
        from neo4j.exceptions import DriverError, Neo4jError

        try:
            yield
        except (DriverError, Neo4jError, ValueError) as exc:
            raise self._error(exc) from None

    def _driver(self):
        """A driver that has connected and authenticated once (so a bad URL or password fails here)."""
        if self._drv is not None:
            return self._drv
        import neo4j

        auth = (self.user, self._password) if self._password is not None else None
        with self._translated():
            drv = neo4j.GraphDatabase.driver(self.url, auth=auth, connection_timeout=self.timeout_s,
                                             max_transaction_retry_time=self.timeout_s)
        try:
            with self._translated():
                drv.verify_connectivity()
        except GraphStoreError:
            drv.close()
            raise
        self._drv = drv
        return drv

    def _session(self):
        drv = self._driver()
        key = (self.url, self.database)
        if key not in _SCHEMA_READY:
            with self._translated():
                for q in SCHEMA:
                    drv.execute_query(q, database_=self.database)
            _SCHEMA_READY.add(key)
        return drv.session(database=self.database)

    def write(self, model: BusinessModel) -> None:
        """Upsert the intent's subgraph: unchanged parts stay, stale ones go, other intents are untouched."""
        params = graph_params(model)
        with self._translated(), self._session() as s:
            s.execute_write(_write_tx, params)

    def read(self, intent: str) -> BusinessModel | None:
        with self._translated(), self._session() as s:
            return s.execute_read(_read_tx, intent)

    def impact(self, entity: str) -> list[dict[str, Any]]:
        """Which intents define an entity of that name, and which of their entities reference it."""
        with self._translated(), self._session() as s:
            rows = s.execute_read(lambda tx: [r.data() for r in tx.run(IMPACT, name=entity)])
        return impact_rows(rows)

    def query(self, cypher: str, **params: Any) -> list[dict[str, Any]]:
        """Run one Cypher statement in its own transaction (ad-hoc reads, test setup); rows as dicts."""
        with self._translated():
            records, _, _ = self._driver().execute_query(cypher, params, database_=self.database)
        return [r.data() for r in records]

    def ping(self) -> str | None:
        """None when Neo4j answers a query, else why not (for a status display; never raises)."""
        try:
            with self._translated():
                self._driver().execute_query("RETURN 1", database_=self.database)
        except GraphStoreError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a status line reports, it never raises
            return f"Neo4j at {display_url(self.url)}: {type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        if self._drv is not None:
            self._drv.close()
            self._drv = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Neo4jGraphStoreResource(dg.ConfigurableResource):
    """The business-model graph in Neo4j over Bolt; the password comes in through dg.EnvVar."""

    url: str
    user: str = "neo4j"
    password: str | None = None
    database: str | None = None
    _store: Neo4jGraphStore | None = PrivateAttr(default=None)

    def store(self) -> Neo4jGraphStore:
        if self._store is None:
            self._store = Neo4jGraphStore(self.url, self.user, self.password, database=self.database)
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
