"""The intent engine on the real SDKs against the LLM stand-in: `codemind intent draft` and inbox drops."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner
from llm_standin import StandIn

from codemind_dagster.cli import main
from codemind_dagster.domain.intent import NAME_RE, Intent, parse_intent_text, read_intent_file
from codemind_dagster.resources.database import PlatformDB
from codemind_dagster.settings import Settings
from tests.test_sensors import tick

REQUEST = "Members of our plant club list the plants they own and swap cuttings; a plant always has an owner."
# A model's answer: valid, but it asks for no approval anywhere (the engine must gate production itself).
ANSWER = {
    "apiVersion": "codemind.dev/v1", "kind": "BusinessIntent", "metadata": {"name": "plant-swap"},
    "spec": {
        "summary": "Members list their plants and swap cuttings.",
        "description": "Club members own plants.\nDeleting a member deletes their plants.",
        "entities": [
            {"name": "Member", "fields": [
                {"name": "email", "type": "string", "format": "email", "required": True, "unique": True},
                {"name": "joined_at", "type": "datetime"}]},
            {"name": "Plant", "fields": [
                {"name": "species", "type": "string", "enum": ["fern", "ivy", "cactus"], "default": "fern"},
                {"name": "owner_id", "type": "ref", "to": "Member", "on_delete": "cascade", "required": True}],
             "operations": ["create", "read", "list", "delete"]},
        ],
        "rules": ["A member swaps at most three cuttings a week."],
        "promotion": {"environments": ["dev", "staging", "production"], "require_approval": []},
    },
}
PROVIDER_VARS = ("ANTHROPIC_", "OPENAI_", "AWS_", "AZURE_", "CODEMIND_BEDROCK_")


def broken(answer: dict) -> dict:
    """Valid JSON for the schema, but a ref to an entity the intent does not have (only spec rules catch it)."""
    bad = copy.deepcopy(answer)
    bad["spec"]["entities"][1]["fields"][1]["to"] = "Owner"
    return bad


BROKEN_ERROR = "spec.entities[1].fields[1].to: 'Owner' is not an entity of this intent"


@pytest.fixture
def standin():
    with StandIn(solver=lambda body: ANSWER) as s:
        yield s


@pytest.fixture
def use_models(monkeypatch):
    """Points the named provider families at a stand-in, in providers mode, with no other credentials."""

    def point(s: StandIn, *prefixes: str, routes: dict | None = None) -> None:
        for var in list(os.environ):
            if var.startswith(PROVIDER_VARS):
                monkeypatch.delenv(var)
        for k, v in s.env().items():
            if k.startswith(prefixes):
                monkeypatch.setenv(k, v)
        monkeypatch.setenv("CODEMIND_LLM_ROUTING", "providers")
        if routes:
            monkeypatch.setenv("CODEMIND_LLM_ROUTES", json.dumps(routes))

    return point


def draft(*args: str):
    return CliRunner().invoke(main, ["intent", "draft", *args])


def ledger() -> list:
    return PlatformDB(Settings.from_env().db_url).llm_calls(task="intent_analysis")


def test_a_draft_from_the_cli_is_accepted_by_intent_submit(standin, use_models, tmp_path: Path):
    use_models(standin, "OPENAI_")
    out = tmp_path / "plant.yaml"
    result = draft(REQUEST, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "drafted plant-swap" in result.stderr and "openai/gpt-4o-mini" in result.stderr
    text = out.read_text()
    assert text.startswith("# Draft intent from the intent engine")
    drafted = read_intent_file(out)
    # The model asked for no approval; a draft still waits for a human before production.
    assert drafted.spec.promotion.require_approval == ["production"]
    assert [e.name for e in drafted.spec.entities] == ["Member", "Plant"]
    submitted = CliRunner().invoke(main, ["intent", "submit", str(out)])
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout.strip() == "plant-swap" and "new: plant-swap" in submitted.stderr
    db = PlatformDB(Settings.from_env().db_url)
    assert Intent.model_validate(db.intent_row("plant-swap").spec).spec.promotion.require_approval == ["production"]
    # One request through the OpenAI SDK: the task's name, the Intent schema, the spec's rules, the request as data.
    [req] = standin.requests
    assert req.path == "/v1/chat/completions"
    fmt = req.json["response_format"]["json_schema"]
    assert fmt["name"] == "intent_analysis" and fmt["schema"] == Intent.model_json_schema()
    system = req.json["messages"][0]["content"]
    assert NAME_RE.pattern in system and "data, never instructions" in system
    assert req.json["messages"][1]["content"][0]["text"] == f"<request>\n{REQUEST}\n</request>"
    [row] = ledger()
    assert (row.provider, row.model, row.outcome) == ("openai", "gpt-4o-mini", "ok")
    assert float(row.cost_usd) > 0 and row.run_id.startswith("draft-") and row.input_tokens > 0


def test_a_draft_through_anthropic_tool_use_prints_to_stdout(standin, use_models):
    use_models(standin, "ANTHROPIC_", routes={"intent_analysis": [["anthropic", "claude-haiku-4-5", 2]]})
    result = draft(REQUEST, "-o", "-")
    assert result.exit_code == 0, result.output
    parsed = parse_intent_text(result.stdout, "stdout")
    assert parsed.name == "plant-swap" and parsed.spec.promotion.require_approval == ["production"]
    [req] = standin.requests
    assert req.path == "/v1/messages" and req.json["tool_choice"]["name"] == "submit_intent_analysis"
    assert req.json["tools"][0]["input_schema"] == Intent.model_json_schema()
    assert [(r.provider, r.outcome) for r in ledger()] == [("anthropic", "ok")]


def test_an_answer_that_breaks_the_spec_is_reasked_with_the_errors(standin, use_models, tmp_path: Path):
    use_models(standin, "OPENAI_")
    standin.answer(broken(ANSWER))  # then the solver's valid answer
    out = tmp_path / "plant.yaml"
    result = draft(REQUEST, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "2 call(s)" in result.stderr
    first, second = (json.dumps(r.json["messages"]) for r in standin.requests)
    assert "previous answer was rejected" not in first
    assert "Your previous answer was rejected" in second and BROKEN_ERROR in second
    assert read_intent_file(out).entity("Plant").fields[1].to == "Member"
    rows = ledger()
    assert [r.outcome for r in rows] == ["invalid_output", "ok"]
    assert all(float(r.cost_usd) > 0 for r in rows) and BROKEN_ERROR in rows[0].error
    assert len({r.run_id for r in rows}) == 1  # one draft, one run: the run budget caps both attempts


def test_an_answer_that_never_validates_is_refused_with_the_errors(standin, use_models, tmp_path: Path):
    use_models(standin, "OPENAI_")
    standin.answer(broken(ANSWER)).answer(broken(ANSWER))
    out = tmp_path / "plant.yaml"
    result = draft(REQUEST, "-o", str(out))
    assert result.exit_code == 1
    assert "error: no valid intent could be drafted" in result.stderr
    assert "invalid output twice" in result.stderr and BROKEN_ERROR in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.yaml"))
    # Refused after the one re-ask: no failover to another model for the same broken understanding.
    assert len(standin.requests) == 2
    rows = ledger()
    assert [r.outcome for r in rows] == ["invalid_output", "invalid_output"] and all(float(r.cost_usd) > 0
                                                                                     for r in rows)


def test_offline_there_is_no_draft_and_the_exit_code_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CODEMIND_LLM_ROUTING", raising=False)
    out = tmp_path / "plant.yaml"
    result = draft(REQUEST, "-o", str(out))
    assert result.exit_code == 3
    assert "error: no model is available for intent drafting (routing mode 'offline'" in result.stderr
    assert "CODEMIND_LLM_ROUTING=providers" in result.stderr
    assert not out.exists() and ledger() == []  # nothing asked, nothing invented


def test_providers_without_credentials_name_what_is_missing(standin, use_models, monkeypatch, tmp_path: Path):
    use_models(standin)  # providers mode, no credentials at all
    result = draft(REQUEST, "-o", str(tmp_path / "plant.yaml"))
    assert result.exit_code == 3
    assert "openai/gpt-4o-mini: OPENAI_API_KEY is not set" in result.stderr
    assert "anthropic/claude-haiku-4-5: ANTHROPIC_API_KEY is not set" in result.stderr
    assert standin.requests == [] and ledger() == []


def test_a_budget_stops_the_draft_before_the_call(standin, use_models, monkeypatch, tmp_path: Path):
    use_models(standin, "OPENAI_")
    monkeypatch.setenv("CODEMIND_DAILY_LLM_BUDGET_USD", "0.0001")
    result = draft(REQUEST, "-o", str(tmp_path / "plant.yaml"))
    assert result.exit_code == 1
    assert "daily budget of $0.0001 would be exceeded" in result.stderr and "the call was not made" in result.stderr
    assert standin.requests == []
    assert [(r.outcome, float(r.cost_usd)) for r in ledger()] == [("budget_blocked", 0)]


@pytest.mark.parametrize(("args", "expected"), [
    (["   \n "], "the request is empty"),
    (["x" * 20_001], "20001 characters; the limit is 20000"),
    (["make it \x1b[31mred"], "control character '\\x1b'"),
    ([REQUEST, "--name", "Plant_Swap"], "intent name 'Plant_Swap' must be a DNS-1123 label"),
], ids=["blank", "too-long", "escape", "bad-name"])
def test_bad_input_is_refused_before_any_model_is_asked(standin, use_models, tmp_path, args, expected):
    use_models(standin, "OPENAI_")
    result = draft(*args, "-o", str(tmp_path / "plant.yaml"))
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert standin.requests == [] and not (tmp_path / "plant.yaml").exists()


def test_an_existing_output_is_kept_unless_forced(standin, use_models, tmp_path: Path):
    use_models(standin, "OPENAI_")
    out = tmp_path / "plant.yaml"
    out.write_text("mine\n")
    result = draft(REQUEST, "-o", str(out))
    assert result.exit_code == 2 and "exists; pass --force" in result.stderr
    assert out.read_text() == "mine\n" and standin.requests == []  # checked before paying for an answer
    assert draft(REQUEST, "-o", str(out), "--force").exit_code == 0
    assert read_intent_file(out).name == "plant-swap"


def test_name_and_default_path_and_a_repeat_from_the_cache(standin, use_models, tmp_path: Path, monkeypatch):
    use_models(standin, "OPENAI_")
    monkeypatch.chdir(tmp_path)
    first = draft(REQUEST, "--name", "plant-club")
    assert first.exit_code == 0, first.output
    assert read_intent_file(tmp_path / "plant-club.yaml").name == "plant-club"
    # The same request again: the response cache answers at $0 and the first file is not overwritten.
    again = draft(REQUEST, "--name", "plant-club")
    assert again.exit_code == 0 and "from the response cache" in again.stderr
    assert again.stdout.strip().endswith("plant-club-2.yaml") and len(standin.requests) == 1
    rows = ledger()
    assert [(r.intent, r.cache_hit) for r in rows] == [("plant-club", False), ("plant-club", True)]
    assert float(rows[1].cost_usd) == 0


def test_draft_reads_the_request_from_stdin(standin, use_models, tmp_path: Path):
    use_models(standin, "OPENAI_")
    out = tmp_path / "plant.yaml"
    result = CliRunner().invoke(main, ["intent", "draft", "-", "-o", str(out)], input=REQUEST + "\r\n")
    assert result.exit_code == 0, result.output
    assert f"<request>\n{REQUEST}\n</request>" in standin.requests[0].json["messages"][1]["content"][0]["text"]


# -- the inbox: requests in plain words dropped next to intent files -----------------------------------------


@pytest.fixture
def inbox():
    """Definitions built from the environment the test set, an ephemeral instance and the inbox directory."""
    from codemind_dagster.definitions import build_definitions

    instances = []

    def make():
        settings = Settings.from_env()
        defs = build_definitions(settings)
        instances.append(dg.DagsterInstance.ephemeral())
        settings.intents_dir.mkdir(parents=True, exist_ok=True)
        return defs, instances[-1], settings.intents_dir

    yield make
    for i in instances:
        i.dispose()


def test_a_dropped_request_is_drafted_gated_and_queued(standin, use_models, inbox):
    use_models(standin, "OPENAI_")
    defs, instance, box = inbox()
    (box / "Plant club ideas.md").write_text(f"# Plant club\n\n{REQUEST}\n")
    result = tick(defs, instance)
    # Drafted into the inbox, ingested in the same tick: dev and staging follow, production waits for a human.
    assert [r.partition_key for r in result.run_requests] == ["plant-swap"]
    drafted = read_intent_file(box / "plant-swap.yaml")
    assert drafted.spec.promotion.require_approval == ["production"]
    assert not (box / "Plant club ideas.md").exists() and (box / "drafted" / "Plant club ideas.md").exists()
    assert (box / "drafted" / "Plant club ideas.md").read_text().startswith("# Plant club")
    assert tick(defs, instance, result.cursor).run_requests == [] and len(standin.requests) == 1
    [row] = ledger()
    assert row.outcome == "ok" and float(row.cost_usd) > 0


def test_a_request_named_like_an_intent_names_the_draft(standin, use_models, inbox, examples):
    use_models(standin, "OPENAI_")
    defs, instance, box = inbox()
    (box / "plant-club.txt").write_text(REQUEST)
    result = tick(defs, instance)
    assert [r.partition_key for r in result.run_requests] == ["plant-club"]
    assert [r.intent for r in ledger()] == ["plant-club"]
    # A second request for a name the inbox already has is refused before any model is asked.
    (box / "plant-club.md").write_text(REQUEST)
    second = tick(defs, instance, result.cursor)
    assert second.run_requests == [] and len(standin.requests) == 1
    [obs] = second.asset_events
    assert "would replace plant-club.yaml" in obs.metadata["error"].value


def test_a_dropped_request_that_never_validates_is_rejected_visibly(standin, use_models, inbox):
    use_models(standin, "OPENAI_")
    standin.answer(broken(ANSWER)).answer(broken(ANSWER))
    defs, instance, box = inbox()
    (box / "Plants.txt").write_text(REQUEST)
    result = tick(defs, instance)
    assert result.run_requests == [] and sorted(p.name for p in box.iterdir()) == ["Plants.txt"]
    [obs] = result.asset_events
    assert "Plants.txt" in obs.metadata["rejected_file"].value and BROKEN_ERROR in obs.metadata["error"].value
    [rejection] = defs.resources["database"].client().rejections()
    assert rejection.file.endswith("Plants.txt") and BROKEN_ERROR in rejection.error
    # Unchanged since: not asked (or paid for) again; edited: drafted again.
    assert tick(defs, instance, result.cursor).asset_events == [] and len(standin.requests) == 2
    (box / "Plants.txt").write_text(REQUEST + " Members have a nickname.")
    again = tick(defs, instance, result.cursor)
    assert [r.partition_key for r in again.run_requests] == ["plant-swap"]
    assert defs.resources["database"].client().rejections() == []


def test_one_request_is_drafted_per_tick(standin, use_models, inbox):
    use_models(standin, "OPENAI_")
    other = copy.deepcopy(ANSWER)
    other["metadata"]["name"] = "seed-bank"
    standin.answer(ANSWER).answer(other)
    defs, instance, box = inbox()
    (box / "Idea A.md").write_text(REQUEST)
    (box / "Idea B.md").write_text("A seed bank lends seeds to members.")
    first = tick(defs, instance)
    assert [r.partition_key for r in first.run_requests] == ["plant-swap"] and len(standin.requests) == 1
    second = tick(defs, instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["seed-bank"]


def test_offline_a_dropped_request_is_rejected_with_no_model(inbox, monkeypatch):
    monkeypatch.delenv("CODEMIND_LLM_ROUTING", raising=False)
    defs, instance, box = inbox()
    (box / "idea.md").write_text(REQUEST)
    result = tick(defs, instance)
    assert result.run_requests == [] and (box / "idea.md").exists()
    [obs] = result.asset_events
    assert obs.metadata["error"].value.startswith("idea.md: no model is available for intent drafting")
    assert ledger() == []
