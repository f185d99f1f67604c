"""AWS spend of one UTC day from Cost Explorer, by service and environment tag, and daily budgets per environment."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import dagster as dg

TAG_KEY = "codemind:environment"
METRIC = "UnblendedCost"
# Few attempts, short timeouts: a wrong endpoint or a denied role is a configuration error, not a blip.
MAX_ATTEMPTS = 2
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
# Cost Explorer pages its groups; a token that keeps coming back would otherwise loop forever.
MAX_PAGES = 1000
DENIED = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
          "ExpiredTokenException", "SignatureDoesNotMatch"}
BUDGETS_VAR = "CODEMIND_AWS_BUDGETS"


class AwsCostError(RuntimeError):
    """Cost Explorer could not give the day's spend; the message names the endpoint, the region and why."""


class AwsBudgetsError(ValueError):
    """CODEMIND_AWS_BUDGETS is not a JSON object of environment -> daily USD."""


def parse_tag_value(key: str, tag_key: str) -> str | None:
    """The environment of a TAG group key ("codemind:environment$production"); None when the cost is untagged."""
    prefix = f"{tag_key}$"
    value = key[len(prefix):] if key.startswith(prefix) else key.partition("$")[2] if "$" in key else key
    return value or None


def parse_groups(pages: Iterable[Mapping[str, Any]], tag_key: str = TAG_KEY) -> list[dict[str, Any]]:
    """(service, environment) groups of get_cost_and_usage pages, summed exactly; zero amounts are dropped."""
    acc: dict[tuple[str, str | None, str], dict[str, Any]] = {}
    for page in pages:
        for period in page.get("ResultsByTime", []):
            for group in period.get("Groups", []):
                keys = group.get("Keys", [])
                if len(keys) != 2:
                    raise AwsCostError(f"Cost Explorer returned a group with keys {keys!r}: expected "
                                       f"[service, {tag_key}$value]")
                metric = group.get("Metrics", {}).get(METRIC, {})
                try:
                    amount = Decimal(metric.get("Amount", "0"))
                except InvalidOperation:
                    raise AwsCostError(f"Cost Explorer returned {METRIC} {metric.get('Amount')!r} for "
                                       f"{keys[0]}: not a number") from None
                unit = metric.get("Unit") or "USD"
                key = (keys[0], parse_tag_value(keys[1], tag_key), unit)
                g = acc.setdefault(key, {"service": key[0], "environment": key[1], "currency": unit,
                                         "cost": Decimal(0), "estimated": False})
                g["cost"] += amount
                g["estimated"] = g["estimated"] or bool(period.get("Estimated"))
    return sorted((g for g in acc.values() if g["cost"] != 0),
                  key=lambda g: (g["service"], g["environment"] is None, g["environment"] or "", g["currency"]))


def parse_budgets(text: str | None) -> dict[str, Decimal]:
    """Daily AWS budget in USD per environment from JSON such as {"production": 50, "staging": 10}."""
    if text is None or not text.strip():
        return {}
    example = '{"production": 50, "staging": 10}'
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AwsBudgetsError(f"{BUDGETS_VAR} is not JSON (line {e.lineno} column {e.colno}): "
                         f"expected {example}") from None
    if not isinstance(raw, dict):
        raise AwsBudgetsError(f"{BUDGETS_VAR} must be a JSON object of environment -> daily USD, e.g. {example}; "
                         f"found a {type(raw).__name__}")
    out: dict[str, Decimal] = {}
    for env, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AwsBudgetsError(f"{BUDGETS_VAR}: the budget of {env!r} is {value!r}, expected a number of USD > 0")
        out[env] = Decimal(str(value))
    return out


class AwsCostResource(dg.ConfigurableResource):
    """AWS Cost Explorer: the day's UnblendedCost by service and environment tag, and budgets per environment."""

    enabled: bool = False
    region_name: str | None = "us-east-1"
    endpoint_url: str | None = None  # None: boto3's own resolution, which honours AWS_ENDPOINT_URL
    tag_key: str = TAG_KEY
    budgets_json: str | None = None

    def budgets(self) -> dict[str, Decimal]:
        return parse_budgets(self.budgets_json)

    def client(self):
        """A Cost Explorer client with dagster-aws's retry config and short timeouts."""
        import boto3
        from botocore.config import Config
        from dagster_aws.utils import construct_boto_client_retry_config

        config = construct_boto_client_retry_config(MAX_ATTEMPTS).merge(
            Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S))
        return boto3.session.Session(region_name=self.region_name).client(
            "ce", endpoint_url=self.endpoint_url, config=config)

    def day_costs(self, day: date) -> list[dict[str, Any]]:
        """The UTC day's cost groups (service, environment or None, currency, cost, estimated), every page read."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        client = self.client()
        where = f"AWS Cost Explorer at {client.meta.endpoint_url} (region {self.region_name or 'default'})"
        request: dict[str, Any] = {
            "TimePeriod": {"Start": day.isoformat(), "End": (day + timedelta(days=1)).isoformat()},
            "Granularity": "DAILY", "Metrics": [METRIC],
            "GroupBy": [{"Type": "DIMENSION", "Key": "SERVICE"}, {"Type": "TAG", "Key": self.tag_key}],
        }
        pages: list[dict[str, Any]] = []
        try:
            while len(pages) < MAX_PAGES:
                page = client.get_cost_and_usage(**request)
                pages.append(page)
                token = page.get("NextPageToken")
                if not token:
                    break
                request["NextPageToken"] = token
            else:
                raise AwsCostError(f"{where} returned more than {MAX_PAGES} pages for {day}")
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = code if code and not code.isdigit() else f"HTTP {status}"
            if status == 403 or code in DENIED:
                raise AwsCostError(f"{where}: access denied ({detail}); the role needs ce:GetCostAndUsage. "
                                   f"AWS spend for {day} is not reported") from None
            message = e.response.get("Error", {}).get("Message", "")
            raise AwsCostError(f"{where} answered {detail} for {day}" + (f": {message}" if message else "")) from None
        except NoCredentialsError:
            raise AwsCostError(f"{where}: no AWS credentials found; AWS spend for {day} is not reported") from None
        except BotoCoreError as e:
            raise AwsCostError(f"{where} is unreachable ({type(e).__name__}); AWS spend for {day} "
                               "is not reported") from None
        return parse_groups(pages, self.tag_key)
