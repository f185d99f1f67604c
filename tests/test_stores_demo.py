"""The demo on the production stores: graphs in a real Neo4j, bundles in S3 on moto's server."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
import yaml

from tests.test_cli import codemind

EXAMPLES = Path(__file__).parent.parent / "examples" / "intents"
SAMPLES = ("incident-tracker.yaml", "library-lending.yaml")
# The README's query, verbatim: users paste it into cypher-shell or the Neo4j browser.
README_QUERY = ("MATCH (i:Intent)-[:DEFINES]->(e:Entity) OPTIONAL MATCH (e)-[r:REFERENCES]->(t:Entity) "
                "RETURN i.name AS intent, e.name AS entity, e.collection AS collection, "
                "collect(r.field + ' -> ' + t.name + ' (' + r.on_delete + ')') AS references "
                "ORDER BY intent, entity")


def expected_rows(path: Path) -> list[dict]:
    """What the README query returns for one intent file, read from the file itself."""
    from codemind_dagster.domain.intent import read_intent_file

    intent = read_intent_file(path)
    rows = []
    for e in intent.spec.entities:
        refs = sorted(f"{f.name} -> {f.to} ({f.effective_on_delete})" for f in e.fields if f.type == "ref")
        rows.append({"intent": intent.name, "entity": e.name, "collection": e.collection, "references": refs})
    return sorted(rows, key=lambda r: r["entity"])


@pytest.mark.slow
@pytest.mark.neo4j
@pytest.mark.aws
def test_demo_leaves_the_sample_graphs_in_neo4j_and_bundles_in_s3(neo4j_graph, neo4j_server, aws, tmp_path,
                                                                  codemind_home, runtime_cleanup):
    inbox = tmp_path / "samples"
    inbox.mkdir()
    for name in SAMPLES:
        shutil.copy(EXAMPLES / name, inbox / name)
    env = {"CODEMIND_NEO4J_URL": neo4j_server.url, "CODEMIND_NEO4J_PASSWORD": neo4j_server.password,
           "CODEMIND_S3_BUCKET": "codemind-demo-artifacts", "CODEMIND_S3_ENDPOINT_URL": aws}
    r = codemind("demo", "--intents", str(inbox), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = neo4j_graph.query(README_QUERY)
    for row in rows:
        row["references"] = sorted(row["references"])
    assert rows == [row for name in sorted(SAMPLES) for row in expected_rows(inbox / name)]
    assert any(row["references"] for row in rows), "the samples have references"
    assert neo4j_server.password not in r.stdout + r.stderr

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="codemind-demo-artifacts")["Contents"]]
    bundles = [k for k in keys if k.startswith("sha256/") and k.endswith(".tar.gz")]
    assert len(bundles) >= len(SAMPLES), keys
    status = yaml.safe_load(codemind("status", "--json", env=env).stdout)
    assert {s["name"]: s["state"] for s in status["intents"]} == {"incident-tracker": "live", "library-lending": "live"}
    assert all(len(e["artifact"]) == 64 and f"sha256/{e['artifact']}.tar.gz" in bundles
               for s in status["intents"] for e in s["environments"].values())
    codemind("down", env=env)
