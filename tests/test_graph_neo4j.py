"""Neo4jGraphStore against a real Neo4j: idempotent upserts, replaced subgraphs, SQL parity, impact, errors."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from codemind_dagster.domain.business_model import BusinessModel, Edge, build_business_model
from codemind_dagster.domain.intent import Intent, parse_intent_text, read_intent_file
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.resources.graph import SqlGraphStore
from codemind_dagster.resources.graph_neo4j import GraphStoreError, Neo4jGraphStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "intents"
# Another team's intent that shares an entity name with loyalty-points and references it.
REFERRALS = """\
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata:
  name: loyalty-referrals
spec:
  summary: Customers refer friends and earn a bonus when the friend joins.
  entities:
    - name: Customer
      fields:
        - name: email
          type: string
          required: true
    - name: Referral
      fields:
        - name: referrer_id
          type: ref
          to: Customer
          required: true
        - name: friend_email
          type: string
          required: true
      operations: [create, read, list]
"""


def samples() -> list[Intent]:
    return [read_intent_file(p) for p in sorted(EXAMPLES.glob("*.yaml"))]


def sample(name: str) -> Intent:
    return next(i for i in samples() if i.name == name)


def changed(intent: Intent, edit) -> Intent:
    data = intent.canonical()
    edit(data["spec"])
    return parse_intent_text(yaml.safe_dump(data), f"{intent.name}.yaml")


@pytest.fixture
def sql(tmp_path: Path) -> SqlGraphStore:
    db = PlatformDB(f"sqlite:///{tmp_path / 'platform.db'}")
    db.migrate()
    return SqlGraphStore(db)


def counts(store: Neo4jGraphStore) -> dict[str, int]:
    nodes = store.query("MATCH (n) RETURN labels(n)[0] AS k, count(*) AS n")
    rels = store.query("MATCH ()-[r]->() RETURN type(r) AS k, count(*) AS n")
    return {r["k"]: r["n"] for r in nodes + rels}


def element_ids(store: Neo4jGraphStore, intent: str) -> dict[str, str]:
    rows = store.query("MATCH (n) WHERE n.intent = $i OR (n:Intent AND n.name = $i) "
                       "RETURN labels(n)[0] + ':' + coalesce(n.entity + '.', '') + n.name AS k, elementId(n) AS id",
                       i=intent)
    return {r["k"]: r["id"] for r in rows}


def expected_counts(*models: BusinessModel) -> dict[str, int]:
    fields = sum(len(n.properties["fields"]) for m in models for n in m.nodes)
    entities = sum(len(m.nodes) for m in models)
    return {"Intent": len(models), "Entity": entities, "Field": fields, "DEFINES": entities,
            "HAS_FIELD": fields, "REFERENCES": sum(len(m.edges) for m in models)}


def without_version(m: BusinessModel | None) -> dict | None:
    return None if m is None else m.model_dump(exclude={"version"})


neo4j = pytest.mark.neo4j


@neo4j
def test_writing_twice_changes_nothing(neo4j_graph):
    model = build_business_model(sample("library-lending"))
    neo4j_graph.write(model)
    before, ids = counts(neo4j_graph), element_ids(neo4j_graph, model.intent)
    assert before == expected_counts(model)
    neo4j_graph.write(model)
    assert counts(neo4j_graph) == before
    assert element_ids(neo4j_graph, model.intent) == ids, "a rerun must update in place, not recreate"


@neo4j
def test_read_equals_the_sql_store_for_every_sample(neo4j_graph, sql):
    for intent in samples():
        model = build_business_model(intent)
        neo4j_graph.write(model)
        sql.write(model)
    for intent in samples():
        got = neo4j_graph.read(intent.name)
        assert without_version(got) == without_version(sql.read(intent.name))
        assert got.version == intent.content_hash
        # Same content as written, in the stores' order (entities by name, references by ends).
        assert sorted(n.key for n in got.nodes) == sorted(n.key for n in build_business_model(intent).nodes)
    assert neo4j_graph.read("no-such-intent") is None and sql.read("no-such-intent") is None
    assert counts(neo4j_graph) == expected_counts(*(build_business_model(i) for i in samples()))


@neo4j
def test_a_changed_intent_replaces_its_old_subgraph(neo4j_graph, sql):
    old = sample("library-lending")
    neo4j_graph.write(build_business_model(old))
    kept = element_ids(neo4j_graph, old.name)

    def edit(spec):
        spec["entities"] = [e for e in spec["entities"] if e["name"] != "Loan"]  # Loan referenced Book and Person
        author = next(e for e in spec["entities"] if e["name"] == "Author")
        author["fields"] = [f for f in author["fields"] if f["name"] != "website"] + [
            {"name": "born_in", "type": "integer", "minimum": 0}]
        next(e for e in spec["entities"] if e["name"] == "Book")["plural"] = "titles"

    new = changed(old, edit)
    model = build_business_model(new)
    neo4j_graph.write(model)
    sql.write(model)
    assert without_version(neo4j_graph.read(new.name)) == without_version(sql.read(new.name))
    assert neo4j_graph.read(new.name).version == new.content_hash != old.content_hash
    assert counts(neo4j_graph) == expected_counts(model)
    assert neo4j_graph.query("MATCH (n) WHERE n.name = 'Loan' OR n.entity = 'Loan' OR n.name = 'website' "
                             "RETURN count(n) AS n") == [{"n": 0}]
    assert neo4j_graph.query("MATCH (:Entity {name: 'Book'}) RETURN 1 AS one") == [{"one": 1}]
    now = element_ids(neo4j_graph, new.name)
    assert now["Entity:Author"] == kept["Entity:Author"] and now["Field:Book.isbn"] == kept["Field:Book.isbn"]
    book = next(n for n in neo4j_graph.read(new.name).nodes if n.key == "Book")
    assert book.properties["collection"] == "titles"


@neo4j
def test_intents_coexist_and_a_write_touches_only_its_own(neo4j_graph):
    models = [build_business_model(i) for i in samples()]
    for m in models:
        neo4j_graph.write(m)
    others = {m.intent: (neo4j_graph.read(m.intent), element_ids(neo4j_graph, m.intent))
              for m in models if m.intent != "loyalty-points"}
    smaller = changed(sample("loyalty-points"),
                      lambda spec: spec.update(entities=[e for e in spec["entities"] if e["name"] != "Reward"]))
    neo4j_graph.write(build_business_model(smaller))
    for name, (model, ids) in others.items():
        assert neo4j_graph.read(name) == model and element_ids(neo4j_graph, name) == ids
    assert [n.key for n in neo4j_graph.read("loyalty-points").nodes] == ["Customer", "PointsTransaction"]
    # An empty model removes the intent altogether, as the SQL store reads it back (None).
    neo4j_graph.write(BusinessModel(intent="loyalty-points", nodes=[], edges=[]))
    assert neo4j_graph.read("loyalty-points") is None
    assert counts(neo4j_graph)["Intent"] == len(models) - 1


@neo4j
def test_impact_names_every_intent_that_defines_or_references_an_entity(neo4j_graph, sql):
    referrals = parse_intent_text(REFERRALS, "loyalty-referrals.yaml")
    for intent in [*samples(), referrals]:
        neo4j_graph.write(build_business_model(intent))
        sql.write(build_business_model(intent))
    expected = [
        {"intent": "loyalty-points", "entity": "Customer", "relation": "defines", "field": None},
        {"intent": "loyalty-points", "entity": "PointsTransaction", "relation": "references", "field": "customer_id"},
        {"intent": "loyalty-referrals", "entity": "Customer", "relation": "defines", "field": None},
        {"intent": "loyalty-referrals", "entity": "Referral", "relation": "references", "field": "referrer_id"},
    ]
    assert neo4j_graph.impact("Customer") == expected == sql.impact("Customer")
    assert neo4j_graph.impact("Incident") == sql.impact("Incident")
    assert len(neo4j_graph.impact("Incident")) == 3  # defined, referenced by TimelineEntry and by itself
    assert neo4j_graph.impact("Nobody") == [] == sql.impact("Nobody")


@neo4j
def test_the_schema_is_created_and_enforced(neo4j_graph):
    neo4j_graph.write(build_business_model(sample("loyalty-points")))
    constraints = {r["name"]: (r["labelsOrTypes"], r["properties"]) for r in neo4j_graph.query(
        "SHOW CONSTRAINTS YIELD name, labelsOrTypes, properties")}
    assert constraints["codemind_intent_name"] == (["Intent"], ["name"])
    assert constraints["codemind_entity_key"] == (["Entity"], ["intent", "name"])
    assert constraints["codemind_field_key"] == (["Field"], ["intent", "entity", "name"])
    assert "codemind_entity_name" in {r["name"] for r in neo4j_graph.query("SHOW INDEXES YIELD name")}
    with pytest.raises(GraphStoreError, match="refused the request: .*ConstraintValidationFailed"):
        neo4j_graph.query("CREATE (:Entity {intent: 'loyalty-points', name: 'Customer'})")


@neo4j
def test_bad_urls_and_passwords_are_clear_errors_and_write_nothing(neo4j_graph, neo4j_server):
    model = build_business_model(sample("loyalty-points"))
    wrong = Neo4jGraphStore(neo4j_server.url, "neo4j", "not-the-password")
    with pytest.raises(GraphStoreError, match="refused user 'neo4j': wrong password") as ei:
        wrong.write(model)
    assert "not-the-password" not in str(ei.value)
    assert "wrong password" in wrong.ping()
    with pytest.raises(GraphStoreError, match="refused user 'neo4j': no password was given"):
        Neo4jGraphStore(neo4j_server.url, "neo4j", None).read(model.intent)
    port = int(neo4j_server.url.rsplit(":", 1)[1])
    unreachable = Neo4jGraphStore(f"bolt://127.0.0.1:{port + 1 if port < 65535 else 1}", "neo4j", "x", timeout_s=3)
    with pytest.raises(GraphStoreError, match="is not reachable"):
        unreachable.write(model)
    assert "is not reachable" in unreachable.ping()
    with pytest.raises(GraphStoreError, match="URL http://127.0.0.1:7474 is not usable: URI scheme 'http'"):
        Neo4jGraphStore("http://127.0.0.1:7474", "neo4j", "x").write(model)
    assert neo4j_graph.ping() is None
    assert counts(neo4j_graph) == {}


@neo4j
def test_a_model_that_does_not_fit_the_graph_is_refused_before_writing(neo4j_graph):
    model = build_business_model(sample("loyalty-points"))
    dangling = model.model_copy(update={"edges": [*model.edges, Edge(
        src="Reward", dst="Coupon", kind="REFERENCES", properties={"field": "coupon_id"})]})
    with pytest.raises(ValueError, match="edge Reward->Coupon: both ends must be entities"):
        neo4j_graph.write(dangling)
    nested = model.model_copy(deep=True)
    nested.nodes[0].properties["fields"][0]["format"] = {"nested": True}
    with pytest.raises(ValueError, match="property 'format' .* is not a Neo4j property value"):
        neo4j_graph.write(nested)
    assert counts(neo4j_graph) == {}


def materialize_intake(settings, graph_store, names: list[str], files: list[Path]) -> list[dg.AssetMaterialization]:
    """business_intents and business_model materialized for real, one run per intent partition."""
    from codemind_dagster.assets.intake import business_intents, business_model
    from codemind_dagster.resources.intent_store import IntentStore
    from codemind_dagster.resources.platform import DatabaseResource, IntentStoreResource

    db = DatabaseResource(url=settings.db_url)
    for f in files:
        IntentStore(db.client(), settings.intents_dir).submit(f)
    resources = {"intent_store": IntentStoreResource(database=db, directory=str(settings.intents_dir)),
                 "graph_store": graph_store, "database": db}
    out = []
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("intents", names)
        for name in names:
            result = dg.materialize([business_intents, business_model], partition_key=name, instance=instance,
                                    resources=resources)
            out.append(result.asset_materializations_for_node("business_model")[0])
    return out


@neo4j
def test_the_business_model_asset_reports_impact_from_neo4j(neo4j_graph, neo4j_server, settings, tmp_path):
    from codemind_dagster.resources.graph_neo4j import Neo4jGraphStoreResource

    (tmp_path / "loyalty-referrals.yaml").write_text(REFERRALS)
    db = PlatformDB(settings.db_url)
    db.migrate()
    dep = db.start_deployment("loyalty-points", "staging", "sha256:" + "0" * 64, None)
    db.finish_deployment(dep, "live")
    resource = Neo4jGraphStoreResource(url=neo4j_server.url, user=neo4j_server.user, password=neo4j_server.password)
    first, second = materialize_intake(settings, resource, ["loyalty-points", "loyalty-referrals"],
                                       [EXAMPLES / "loyalty-points.yaml", tmp_path / "loyalty-referrals.yaml"])
    assert first.metadata["impact"].value == "No other intent defines or references these entities."
    impact = second.metadata["impact"].value
    assert "| `Customer` | loyalty-points | defines `Customer` | staging |" in impact
    assert "| `Customer` | loyalty-points | `PointsTransaction.customer_id` references it | staging |" in impact
    assert "loyalty-referrals |" not in impact, "the intent's own entities are not its impact"
    assert neo4j_graph.read("loyalty-referrals").version == parse_intent_text(REFERRALS).content_hash


def test_the_business_model_asset_reports_impact_from_sql(settings, tmp_path):
    from codemind_dagster.resources.platform import DatabaseResource, GraphStoreResource

    (tmp_path / "loyalty-referrals.yaml").write_text(REFERRALS)
    resource = GraphStoreResource(database=DatabaseResource(url=settings.db_url))
    _, second = materialize_intake(settings, resource, ["loyalty-points", "loyalty-referrals"],
                                   [EXAMPLES / "loyalty-points.yaml", tmp_path / "loyalty-referrals.yaml"])
    assert "| `Customer` | loyalty-points | `PointsTransaction.customer_id` references it | - |" in \
        second.metadata["impact"].value
