"""FinOps FOCUS 1.2 rows: LLM ledger aggregates (one row per token SKU, x_ columns) and AWS Cost Explorer groups."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

FOCUS_VERSION = "1.2"
CURRENCY = "USD"

# The columns FOCUS 1.2 marks Mandatory for every dataset (conditional columns follow below).
MANDATORY_COLUMNS: tuple[str, ...] = (
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
    "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd",
    "ChargeCategory", "ChargeClass", "ChargeDescription", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "InvoiceIssuerName", "ServiceName", "ServiceCategory",
    "BillingAccountId", "BillingAccountName",
)
# Conditional columns that apply to metered token usage, filled because we know them.
CONDITIONAL_COLUMNS: tuple[str, ...] = (
    "ServiceSubcategory", "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit", "ListUnitPrice",
    "ContractedUnitPrice", "PricingCategory", "SkuId", "SkuPriceId",
)
CUSTOM_COLUMNS: tuple[str, ...] = (
    "x_Intent", "x_Task", "x_Provider", "x_Model", "x_PriceVersion", "x_TokenType",
)
COLUMNS: tuple[str, ...] = MANDATORY_COLUMNS + CONDITIONAL_COLUMNS + CUSTOM_COLUMNS

# Prices are quoted per million tokens, so that is the pricing unit (FOCUS UnitFormat "<quantity> <Units>").
PRICING_UNIT = "1000000 Tokens"
TOKENS_PER_PRICING_UNIT = Decimal(1_000_000)
COST_QUANTUM = Decimal("1e-10")


@dataclass(frozen=True)
class TokenSku:
    kind: str        # SKU suffix and x_TokenType
    column: str      # token column of the ledger aggregate
    price: str       # key in the price table (reasoning is billed at the output price)
    label: str


TOKEN_SKUS: tuple[TokenSku, ...] = (
    TokenSku("input", "input_tokens", "input", "input tokens"),
    TokenSku("cache_write", "cache_write_tokens", "cache_write", "cache write tokens"),
    TokenSku("cache_read", "cache_read_tokens", "cache_read", "cache read tokens"),
    TokenSku("output", "output_tokens", "output", "output tokens"),
    TokenSku("reasoning", "reasoning_tokens", "output", "reasoning tokens"),
)
TOKEN_COLUMNS: tuple[str, ...] = tuple(s.column for s in TOKEN_SKUS)

# Who sells and who invoices: a cloud marketplace (Bedrock, Azure) invoices models published by others.
PROVIDERS: dict[str, tuple[str, str]] = {  # provider -> (ProviderName / InvoiceIssuerName, ServiceName)
    "anthropic": ("Anthropic", "Claude API"),
    "openai": ("OpenAI", "OpenAI API"),
    "bedrock": ("Amazon Web Services", "Amazon Bedrock"),
    "azure": ("Microsoft", "Azure OpenAI Service"),
    "offline": ("CodeMind", "CodeMind offline provider"),
}
# Marketplace model ids carry the maker inside ("global.anthropic.claude-...-v1:0"), so match anywhere.
PUBLISHERS: tuple[tuple[str, str], ...] = (  # model id fragment -> PublisherName
    ("claude", "Anthropic"), ("anthropic", "Anthropic"), ("gpt", "OpenAI"), ("deterministic", "CodeMind"),
)
OPENAI_REASONING_PREFIXES = ("o1", "o3", "o4")


def provider_names(provider: str) -> tuple[str, str]:
    return PROVIDERS.get(provider, (provider.title(), f"{provider.title()} API"))


def publisher_name(provider: str, model: str) -> str:
    m = model.lower()
    for fragment, name in PUBLISHERS:
        if fragment in m:
            return name
    if m.startswith(OPENAI_REASONING_PREFIXES):
        return "OpenAI"
    return provider_names(provider)[0]


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def month_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    end = datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def dec(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value if value is not None else 0))


def fmt(value: Decimal | None) -> str | None:
    """Plain decimal notation: FOCUS numeric format forbids exponents."""
    if value is None:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _allocate(cost: Decimal, weights: list[Decimal]) -> list[Decimal]:
    """Split cost by weight so the parts add up to the cost exactly (the remainder goes to the largest part)."""
    total = sum(weights)
    if total <= 0:
        return [Decimal(0)] * len(weights)
    parts = [(cost * w / total).quantize(COST_QUANTUM) for w in weights]
    biggest = max(range(len(weights)), key=lambda i: weights[i])
    parts[biggest] += cost - sum(parts)
    return parts


def focus_rows(
    aggregates: Iterable[Mapping[str, Any]],
    *,
    day: date,
    prices: Mapping[str, Mapping[str, float]] | None = None,
    price_version: str | None = None,
    billing_account_id: str = "codemind",
    billing_account_name: str = "CodeMind",
) -> list[dict[str, Any]]:
    """One FOCUS row per token SKU of every aggregate (intent, task, provider, model, price version) of a day.

    The ledger's cost is split over the SKUs in proportion to their list cost (token count when the model
    has no price), so BilledCost adds up to the ledger exactly. List unit prices are published only when the
    aggregate was priced with the same price-table version as `prices`.
    """
    prices = prices or {}
    periods = {
        "BillingPeriodStart": iso(month_bounds(day)[0]), "BillingPeriodEnd": iso(month_bounds(day)[1]),
        "ChargePeriodStart": iso(day_bounds(day)[0]), "ChargePeriodEnd": iso(day_bounds(day)[1]),
    }
    rows: list[dict[str, Any]] = []
    for agg in aggregates:
        provider, model = str(agg["provider"]), str(agg["model"])
        version = agg.get("price_version")
        price = prices.get(f"{provider}/{model}")
        tokens = [int(agg.get(s.column) or 0) for s in TOKEN_SKUS]
        cost = dec(agg.get("cost_usd"))
        unit = [dec(price[s.price]) if price else None for s in TOKEN_SKUS]
        weights = [Decimal(t) * u for t, u in zip(tokens, unit, strict=True)] if price else []
        if not weights or sum(weights) <= 0:
            weights = [Decimal(t) for t in tokens]
        skus = [i for i, t in enumerate(tokens) if t > 0]
        if not skus:
            if cost == 0:
                continue
            skus, weights = [0], [Decimal(1)] + [Decimal(0)] * (len(TOKEN_SKUS) - 1)
        billed = dict(zip(skus, _allocate(cost, [weights[i] for i in skus]), strict=True))
        provider_name, service_name = provider_names(provider)
        same_version = price is not None and version == price_version
        for i in skus:
            sku = TOKEN_SKUS[i]
            quantity = Decimal(tokens[i]) / TOKENS_PER_PRICING_UNIT
            list_price = unit[i] if same_version else None
            list_cost = (list_price * quantity).quantize(COST_QUANTUM) if list_price is not None else billed[i]
            intent = agg.get("intent")
            price_text = f" at {fmt(list_price)} {CURRENCY} per 1M tokens" if list_price is not None else ""
            rows.append({
                "BilledCost": fmt(billed[i]),
                "EffectiveCost": fmt(billed[i]),  # no commitment discounts on per-token model APIs
                "ListCost": fmt(list_cost),
                "ContractedCost": fmt(list_cost),  # no negotiated rates: contracted == list
                "BillingCurrency": CURRENCY,
                **periods,
                "ChargeCategory": "Usage",
                "ChargeClass": None,  # null: a regular charge, not a correction of an invoiced period
                "ChargeDescription": f"{model} {sku.label} via {service_name}{price_text}",
                "PricingQuantity": fmt(quantity),
                "PricingUnit": PRICING_UNIT,
                "ProviderName": provider_name,
                "PublisherName": publisher_name(provider, model),
                "InvoiceIssuerName": provider_name,
                "ServiceName": service_name,
                "ServiceCategory": "AI and Machine Learning",
                "BillingAccountId": billing_account_id,
                "BillingAccountName": billing_account_name,
                "ServiceSubcategory": "Generative AI",
                "ChargeFrequency": "Usage-Based",
                "ConsumedQuantity": str(tokens[i]),
                "ConsumedUnit": "Tokens",
                "ListUnitPrice": fmt(list_price),
                "ContractedUnitPrice": fmt(list_price),
                "PricingCategory": "Standard",
                "SkuId": f"{provider}/{model}/{sku.kind}",
                "SkuPriceId": f"{version}/{provider}/{model}/{sku.kind}" if version else None,
                "x_Intent": intent,
                "x_Task": agg.get("task"),
                "x_Provider": provider,
                "x_Model": model,
                "x_PriceVersion": version,
                "x_TokenType": sku.kind,
            })
    return rows


def total_billed(rows: Iterable[Mapping[str, Any]]) -> Decimal:
    return sum((dec(r["BilledCost"]) for r in rows), Decimal(0))


# -- AWS --------------------------------------------------------------------------------------------------
AWS = "AWS"  # ProviderName, PublisherName and InvoiceIssuerName in AWS's own FOCUS export
# FOCUS Tags (a JSON object) only appears when AWS rows do, so a report without them keeps its columns.
CLOUD_COLUMNS: tuple[str, ...] = COLUMNS + ("Tags",)
# Cost Explorer service name fragment -> FOCUS ServiceCategory; first match wins, anything else is Other.
AWS_SERVICE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("bedrock", "AI and Machine Learning"), ("sagemaker", "AI and Machine Learning"),
    ("key management", "Security"), ("secrets manager", "Security"), ("guardduty", "Security"),
    ("waf", "Security"), ("security hub", "Security"), ("shield", "Security"),
    ("kubernetes", "Compute"), ("container", "Compute"), ("compute", "Compute"), ("ec2", "Compute"),
    ("lambda", "Compute"), ("fargate", "Compute"),
    ("storage", "Storage"), ("file system", "Storage"), ("backup", "Storage"), ("glacier", "Storage"),
    ("database", "Databases"), ("dynamodb", "Databases"), ("elasticache", "Databases"),
    ("virtual private cloud", "Networking"), ("vpc", "Networking"), ("cloudfront", "Networking"),
    ("route 53", "Networking"), ("data transfer", "Networking"), ("load balancing", "Networking"),
    ("cloudwatch", "Management and Governance"), ("cloudtrail", "Management and Governance"),
    ("config", "Management and Governance"), ("systems manager", "Management and Governance"),
)


def aws_service_category(service: str) -> str:
    s = service.lower()
    return next((category for fragment, category in AWS_SERVICE_CATEGORIES if fragment in s), "Other")


def aws_rows(
    groups: Iterable[Mapping[str, Any]],
    *,
    day: date,
    tag_key: str,
    billing_account_id: str = "codemind",
    billing_account_name: str = "CodeMind",
) -> list[dict[str, Any]]:
    """One FOCUS row per AWS service and environment tag value of a day, from Cost Explorer's UnblendedCost.

    Cost Explorer sums usage types of different units per service, so there is no one pricing quantity:
    PricingQuantity, PricingUnit and unit prices stay null rather than invented.
    """
    periods = {
        "BillingPeriodStart": iso(month_bounds(day)[0]), "BillingPeriodEnd": iso(month_bounds(day)[1]),
        "ChargePeriodStart": iso(day_bounds(day)[0]), "ChargePeriodEnd": iso(day_bounds(day)[1]),
    }
    rows: list[dict[str, Any]] = []
    for g in groups:
        service, env, cost = str(g["service"]), g.get("environment"), dec(g["cost"])
        where = f"tagged {tag_key}={env}" if env else f"untagged (no {tag_key})"
        rows.append({
            **{c: None for c in CLOUD_COLUMNS},
            "BilledCost": fmt(cost),
            # UnblendedCost amortizes no commitments and Cost Explorer gives no list price here.
            "EffectiveCost": fmt(cost),
            "ListCost": fmt(cost),
            "ContractedCost": fmt(cost),
            "BillingCurrency": g.get("currency") or CURRENCY,
            **periods,
            "ChargeCategory": "Usage",
            "ChargeDescription": f"{service} usage {where}, from AWS Cost Explorer (UnblendedCost)",
            "ProviderName": AWS,
            "PublisherName": AWS,
            "InvoiceIssuerName": AWS,
            "ServiceName": service,
            "ServiceCategory": aws_service_category(service),
            "BillingAccountId": billing_account_id,
            "BillingAccountName": billing_account_name,
            "ChargeFrequency": "Usage-Based",
            "Tags": json.dumps({tag_key: env} if env else {}, sort_keys=True),
        })
    return rows


def is_aws_row(row: Mapping[str, Any]) -> bool:
    """A Cost Explorer row: provider AWS and no token type (Bedrock LLM rows keep theirs and stay LLM rows)."""
    return row.get("ProviderName") == AWS and not row.get("x_TokenType")
