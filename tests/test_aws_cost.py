"""AWS spend in the cost report: Cost Explorer on moto's server, FOCUS rows, budgets per environment."""

from __future__ import annotations

import csv
import json
import socket
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from codemind_dagster.domain import focus
from codemind_dagster.resources.aws_cost import (
    AwsBudgetsError,
    AwsCostError,
    AwsCostResource,
    parse_budgets,
    parse_tag_value,
)

DAY = date(2026, 11, 3)
TAG = "codemind:environment"
EC2 = "Amazon Elastic Compute Cloud - Compute"
S3 = "Amazon Simple Storage Service"
EKS = "Amazon Elastic Container Service for Kubernetes"


def group(service: str, env: str, amount: str, unit: str = "USD") -> dict:
    return {"Keys": [service, f"{TAG}${env}"], "Metrics": {"UnblendedCost": {"Amount": amount, "Unit": unit}}}


def page(groups: list[dict], token: str | None = None, day: date = DAY, estimated: bool = False) -> dict:
    """One get_cost_and_usage answer as Cost Explorer shapes it (GroupBy SERVICE and the environment tag)."""
    out = {"GroupDefinitions": [{"Type": "DIMENSION", "Key": "SERVICE"}, {"Type": "TAG", "Key": TAG}],
           "ResultsByTime": [{"TimePeriod": {"Start": day.isoformat(), "End": (day + timedelta(days=1)).isoformat()},
                              "Total": {}, "Groups": groups, "Estimated": estimated}],
           "DimensionValueAttributes": []}
    if token:
        out["NextPageToken"] = token
    return out


def seed(endpoint: str, *pages: dict) -> None:
    """Queue answers in moto: each distinct request (a new page token is one) takes the next."""
    import httpx

    r = httpx.post(f"{endpoint}/moto-api/static/ce/cost-and-usage-results", json={"results": list(pages)},
                   timeout=10)
    assert r.status_code == 201, r.text


# Ten decimals, as Cost Explorer gives them: float sums would not be exact.
PAGE_1 = page([group(EC2, "production", "12.3456789012"), group(EC2, "staging", "0.0000000036"),
               group(S3, "", "0.1000000001")], token="page-2")
PAGE_2 = page([group(EKS, "production", "7.1"), group(EC2, "production", "0.0000000001"),
               group(S3, "production", "0")])
WANT = [  # (service, environment, cost): EC2/production summed over both pages, the zero group dropped
    (EC2, "production", Decimal("12.3456789013")), (EC2, "staging", Decimal("0.0000000036")),
    (EKS, "production", Decimal("7.1")), (S3, None, Decimal("0.1000000001")),
]
WANT_TOTAL = sum((c for _, _, c in WANT), Decimal(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- Cost Explorer ------------------------------------------------------------------------------------------
@pytest.mark.aws
def test_day_costs_by_service_and_environment_follow_every_page_exactly(aws):
    seed(aws, PAGE_1, PAGE_2)
    groups = AwsCostResource(enabled=True).day_costs(DAY)
    assert [(g["service"], g["environment"], g["cost"]) for g in groups] == WANT
    assert all(isinstance(g["cost"], Decimal) and g["currency"] == "USD" for g in groups)
    assert sum((g["cost"] for g in groups), Decimal(0)) == Decimal("19.5456789050")


@pytest.mark.aws
def test_estimated_days_are_flagged(aws):
    seed(aws, page([group(EC2, "production", "1")], estimated=True))
    assert [g["estimated"] for g in AwsCostResource(enabled=True).day_costs(DAY)] == [True]


def test_tag_values_come_back_prefixed_and_empty_means_untagged():
    assert parse_tag_value(f"{TAG}$production", TAG) == "production"
    assert parse_tag_value(f"{TAG}$", TAG) is None
    assert parse_tag_value("team$data$lake", "team") == "data$lake"  # only the key's own prefix is cut


@pytest.mark.aws
def test_an_unreachable_endpoint_is_a_clear_error_naming_cost_explorer_and_the_region(aws):
    res = AwsCostResource(enabled=True, region_name="eu-west-1", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(AwsCostError, match=r"AWS Cost Explorer at http://127\.0\.0\.1:\d+ \(region eu-west-1\) "
                                           r"is unreachable \(EndpointConnectionError\).*2026-11-03"):
        res.day_costs(DAY)


class _Denied(BaseHTTPRequestHandler):
    """Answers every call as AWS does for a role without ce:GetCostAndUsage."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"__type": "AccessDeniedException", "Message": "User: arn:aws:iam::123456789012:user/x "
                           "is not authorized to perform: ce:GetCostAndUsage"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def denied_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Denied)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.aws
def test_access_denied_is_a_clear_error_naming_the_permission(aws, denied_endpoint):
    res = AwsCostResource(enabled=True, endpoint_url=denied_endpoint)
    with pytest.raises(AwsCostError, match=r"AWS Cost Explorer at .* \(region us-east-1\): access denied "
                                           r"\(AccessDeniedException\); the role needs ce:GetCostAndUsage"):
        res.day_costs(DAY)


# -- FOCUS rows ---------------------------------------------------------------------------------------------
def test_aws_focus_rows_have_the_llm_columns_provider_aws_and_the_environment_tag():
    groups = [{"service": s, "environment": e, "cost": c, "currency": "USD", "estimated": False} for s, e, c in WANT]
    rows = focus.aws_rows(groups, day=DAY, tag_key=TAG, billing_account_id="acct", billing_account_name="Acct")
    assert len(rows) == 4 and all(list(r) == list(focus.CLOUD_COLUMNS) for r in rows)
    assert set(focus.COLUMNS) < set(focus.CLOUD_COLUMNS)
    # Cost Explorer mixes units per service, so there is no pricing quantity to give (see aws_rows).
    nullable = {"ChargeClass", "PricingQuantity", "PricingUnit"}
    for r in rows:
        assert all(r[c] is not None for c in focus.MANDATORY_COLUMNS if c not in nullable), r
        assert (r["ProviderName"], r["PublisherName"], r["InvoiceIssuerName"]) == ("AWS", "AWS", "AWS")
        assert r["ChargeCategory"] == "Usage" and r["BillingCurrency"] == "USD" and r["ChargeClass"] is None
        assert r["BilledCost"] == r["EffectiveCost"] == r["ListCost"] == r["ContractedCost"]
        assert r["ChargePeriodStart"] == "2026-11-03T00:00:00Z" and r["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
        assert focus.is_aws_row(r) and r["x_TokenType"] is None
    assert [(r["ServiceName"], json.loads(r["Tags"]), Decimal(r["BilledCost"])) for r in rows] == [
        (s, {TAG: e} if e else {}, c) for s, e, c in WANT]
    assert [r["ServiceCategory"] for r in rows] == ["Compute", "Compute", "Compute", "Storage"]
    assert "untagged" in rows[3]["ChargeDescription"] and "production" in rows[0]["ChargeDescription"]
    assert rows[1]["BilledCost"] == "0.0000000036"  # plain notation: FOCUS forbids exponents
    assert focus.total_billed(rows) == WANT_TOTAL


def test_bedrock_llm_rows_are_not_taken_for_cost_explorer_rows():
    agg = {"intent": "shop", "task": "coding", "provider": "bedrock", "model": "anthropic.claude-haiku",
           "price_version": "v1", "input_tokens": 10, "cost_usd": Decimal("0.1")}
    assert not any(focus.is_aws_row(r) for r in focus.focus_rows([agg], day=DAY))


# -- budgets ------------------------------------------------------------------------------------------------
def test_budgets_parse_and_bad_settings_say_what_is_wrong():
    assert parse_budgets('{"production": 50, "staging": 2.5}') == {"production": Decimal(50),
                                                                   "staging": Decimal("2.5")}
    assert parse_budgets(None) == {} and parse_budgets(" ") == {}
    for text, message in [("{production: 5}", "is not JSON"), ("[5]", "found a list"),
                          ('{"production": "5"}', "'production' is '5'"), ('{"dev": -1}', "'dev' is -1"),
                          ('{"dev": true}', "'dev' is True")]:
        with pytest.raises(AwsBudgetsError, match=message):
            parse_budgets(text)


def test_budget_vs_actual_per_environment_flags_the_one_over_budget():
    from codemind_dagster.assets.finops import aws_budget_vs_actual

    groups = [{"service": s, "environment": e, "cost": c} for s, e, c in WANT]
    rows = aws_budget_vs_actual(groups, {"production": Decimal(15), "staging": Decimal(1), "dev": Decimal(5)})
    by_scope = {r["scope"]: r for r in rows}
    assert list(by_scope) == ["aws:dev", "aws:production", "aws:staging", "aws:(untagged)"]
    assert by_scope["aws:production"]["spend_usd"] == float(Decimal("19.4456789013"))
    assert by_scope["aws:production"]["percent"] == 129.6
    assert by_scope["aws:dev"]["spend_usd"] == 0.0 and by_scope["aws:dev"]["percent"] == 0.0
    assert by_scope["aws:(untagged)"]["budget_usd"] is None and by_scope["aws:(untagged)"]["percent"] is None
    assert [s for s, r in by_scope.items() if (r["percent"] or 0) >= 100] == ["aws:production"]


# -- the cost report ----------------------------------------------------------------------------------------
LEDGER_COSTS = [Decimal("0.012345"), Decimal("0.5"), Decimal("0.000001")]


def insert_ledger(settings) -> None:
    from codemind_dagster.resources import tables as t
    from codemind_dagster.resources.platform import DatabaseResource

    start = datetime(DAY.year, DAY.month, DAY.day, 8, tzinfo=UTC)
    rows = [{"at": start + timedelta(minutes=i), "run_id": "run-1", "intent": "shop", "task": "coding",
             "provider": provider, "model": model, "input_tokens": 1000, "cache_write_tokens": 0,
             "cache_read_tokens": 0, "output_tokens": 200, "reasoning_tokens": 0, "cost_usd": cost,
             "price_version": "2026-11-01", "latency_ms": 1.0, "outcome": "ok", "cache_hit": False}
            for i, (cost, (provider, model)) in enumerate(zip(LEDGER_COSTS, [
                ("anthropic", "claude-sonnet-4"), ("bedrock", "anthropic.claude-haiku"),
                ("offline", "deterministic")], strict=True))]
    with DatabaseResource(url=settings.db_url).client().tx() as c:
        c.execute(t.llm_ledger.insert(), rows)


def finops_resources(settings, **aws) -> dict:
    """The profile's own resources (so the aws_cost wiring from Settings is what runs)."""
    from codemind_dagster.resources.profiles import resources_for

    res = resources_for(settings.model_copy(update=aws))
    return {k: res[k] for k in ("database", "reports", "llm", "aws_cost")}


def materialize(resources: dict):
    import dagster as dg

    from codemind_dagster.assets.finops import finops_assets

    return dg.materialize(finops_assets, partition_key=DAY.isoformat(), resources=resources, raise_on_error=False)


def metadata(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.mark.aws
def test_cost_report_with_aws_holds_llm_and_aws_rows_and_budgets_per_environment(aws, settings):
    insert_ledger(settings)
    seed(aws, PAGE_1, PAGE_2)
    res = finops_resources(settings, aws_cost=True, aws_budgets='{"production": 15, "staging": 1}')
    assert res["aws_cost"].enabled and res["aws_cost"].region_name == settings.aws_region

    result = materialize(res)
    assert result.success
    assert checks(result) == {"no_negative_costs": True, "no_null_costs": True, "one_currency": True,
                              "totals_reconcile_with_ledger": True}
    path = settings.reports_dir / "focus" / f"{DAY}.csv"
    assert path.read_text().splitlines()[0] == ",".join(focus.CLOUD_COLUMNS)
    report = read_csv(path)
    llm = [r for r in report if r["x_TokenType"]]
    cloud = [r for r in report if r["ProviderName"] == "AWS"]
    assert len(llm) + len(cloud) == len(report) and llm and len(cloud) == 4
    assert sum((Decimal(r["BilledCost"]) for r in llm), Decimal(0)) == sum(LEDGER_COSTS, Decimal(0))
    assert [(r["ServiceName"], json.loads(r["Tags"]), Decimal(r["BilledCost"])) for r in cloud] == [
        (s, {TAG: e} if e else {}, c) for s, e, c in WANT]
    assert all(r["Tags"] == "" for r in llm)  # LLM rows carry no cloud tags

    meta = metadata(result, "cost_report")
    assert meta["aws_cost_usd"] == float(WANT_TOTAL)
    assert meta["billed_cost_usd"] == float(WANT_TOTAL + sum(LEDGER_COSTS, Decimal(0)))
    assert f"| {EKS} | 7.100000 |" in meta["aws_by_service"]
    assert "| (untagged) | 0.100000 |" in meta["aws_by_environment"]
    assert meta["aws_over_budget"] == "aws:production" and meta["aws_estimated"] is False
    ev = next(e for e in result.get_asset_check_evaluations() if e.check_name == "totals_reconcile_with_ledger")
    assert ev.metadata["aws_report_usd"].value == ev.metadata["aws_cost_explorer_usd"].value == float(WANT_TOTAL)

    budget = {b["scope"]: b for b in read_csv(settings.reports_dir / "budget" / f"{DAY}.csv")}
    assert {"aws:production", "aws:staging", "aws:(untagged)"} <= set(budget)
    assert budget["aws:production"]["percent"] == "129.6" and budget["aws:staging"]["percent"] == "0.0"
    assert "aws:production" in metadata(result, "budget_status")["scopes_over_budget"]


@pytest.mark.aws
def test_the_reconcile_check_catches_a_lost_aws_row(aws, settings, monkeypatch):
    from codemind_dagster.assets import finops

    real = focus.aws_rows
    monkeypatch.setattr(finops.focus, "aws_rows", lambda *a, **k: real(*a, **k)[1:])  # a row lost on the way
    seed(aws, PAGE_1, PAGE_2)
    result = materialize(finops_resources(settings, aws_cost=True))
    assert not result.success and checks(result)["totals_reconcile_with_ledger"] is False
    ev = next(e for e in result.get_asset_check_evaluations() if e.check_name == "totals_reconcile_with_ledger")
    assert ev.metadata["aws_report_usd"].value < ev.metadata["aws_cost_explorer_usd"].value


@pytest.mark.aws
def test_disabled_makes_no_aws_call_and_writes_the_llm_report_as_before(aws, settings):
    import boto3

    insert_ledger(settings)
    seed(aws, page([group(EC2, "production", "99")]))
    result = materialize(finops_resources(settings, aws_cost=False, aws_budgets='{"production": 1}'))
    assert result.success and all(checks(result).values())

    # The queued answer is still first in line: no get_cost_and_usage reached moto during the run.
    other_day = {"Start": "2026-01-01", "End": "2026-01-02"}
    answer = boto3.client("ce", region_name="us-east-1").get_cost_and_usage(
        TimePeriod=other_day, Granularity="DAILY", Metrics=["UnblendedCost"])
    assert answer["ResultsByTime"][0]["Groups"][0]["Metrics"]["UnblendedCost"]["Amount"] == "99"

    path = settings.reports_dir / "focus" / f"{DAY}.csv"
    assert path.read_text().splitlines()[0] == ",".join(focus.COLUMNS)
    report = read_csv(path)
    assert report and all(r["x_TokenType"] and r["ProviderName"] != "AWS" for r in report)
    assert sum((Decimal(r["BilledCost"]) for r in report), Decimal(0)) == sum(LEDGER_COSTS, Decimal(0))
    meta = metadata(result, "cost_report")
    assert not [k for k in meta if k.startswith(("aws_", "llm_cost"))]
    assert set(meta) == {"path", "report_path", "billed_cost_usd", "focus_rows", "ledger_rows", "tokens", "by_intent", "by_task",
                         "by_provider", "by_model", "budget_vs_actual"}
    assert "aws:" not in meta["budget_vs_actual"]
    assert not any(b["scope"].startswith("aws:") for b in read_csv(settings.reports_dir / "budget" / f"{DAY}.csv"))


def step_failure(result) -> str:
    """The failed step's error and cause, as the run log shows them."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            return " ".join(e.message for e in (err, err.cause) if e)
    return ""


@pytest.mark.aws
def test_an_unreachable_cost_explorer_fails_the_report_loudly(aws, settings, monkeypatch):
    insert_ledger(settings)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = materialize(finops_resources(settings, aws_cost=True))
    assert not result.success
    assert "AWS Cost Explorer at http://127.0.0.1:" in step_failure(result)
    assert f"(region {settings.aws_region}) is unreachable" in step_failure(result)
    assert not result.asset_materializations_for_node("cost_report")
    assert not (settings.reports_dir / "focus" / f"{DAY}.csv").exists()


@pytest.mark.aws
def test_a_bad_budget_setting_fails_before_any_cost_explorer_call(aws, settings):
    seed(aws, PAGE_1, PAGE_2)
    result = materialize(finops_resources(settings, aws_cost=True, aws_budgets='{"production": "lots"}'))
    assert not result.success and "CODEMIND_AWS_BUDGETS: the budget of 'production'" in step_failure(result)
    # Both pages are still queued: the failed run asked Cost Explorer nothing.
    assert [(g["service"], g["environment"], g["cost"]) for g in AwsCostResource(enabled=True).day_costs(DAY)] \
        == WANT
