"""Provider credentials and endpoints from the environment (or one secret), and the providers built from them."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from codemind_dagster.resources.llm.anthropic_provider import AnthropicProvider, BedrockAnthropicProvider
from codemind_dagster.resources.llm.openai_provider import (
    DEFAULT_AZURE_API_VERSION,
    AzureOpenAIProvider,
    OpenAIProvider,
)
from codemind_dagster.resources.llm.providers import OfflineProvider, Provider

# field -> environment variables, first set wins
ENV: dict[str, tuple[str, ...]] = {
    "anthropic_api_key": ("ANTHROPIC_API_KEY",),
    "anthropic_base_url": ("ANTHROPIC_BASE_URL",),
    "openai_api_key": ("OPENAI_API_KEY",),
    "openai_base_url": ("OPENAI_BASE_URL",),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "bedrock_api_key": ("AWS_BEARER_TOKEN_BEDROCK",),
    "bedrock_region": ("CODEMIND_BEDROCK_REGION", "AWS_REGION"),
    "bedrock_base_url": ("CODEMIND_BEDROCK_BASE_URL",),
    "azure_openai_api_key": ("AZURE_OPENAI_API_KEY",),
    "azure_openai_endpoint": ("AZURE_OPENAI_ENDPOINT",),
    "azure_api_version": ("OPENAI_API_VERSION",),
    "timeout_s": ("CODEMIND_LLM_TIMEOUT_S",),
}


class ProviderConfig(BaseModel):
    """Everything the hosted providers need; secrets are SecretStr so reprs and logs show '**********'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    bedrock_api_key: SecretStr | None = None  # a Bedrock API key, instead of access keys
    bedrock_region: str | None = None
    bedrock_base_url: str | None = None
    azure_openai_api_key: SecretStr | None = None
    azure_openai_endpoint: str | None = None
    azure_api_version: str = DEFAULT_AZURE_API_VERSION
    timeout_s: float = Field(default=120.0, gt=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 secret: Mapping[str, SecretStr] | None = None) -> ProviderConfig:
        """From env vars; with `secret` (keys named like the env vars) credentials come from it alone."""
        e = os.environ if env is None else env
        revealed = {k: v.get_secret_value() for k, v in (secret or {}).items()}
        raw = {}
        for fld, names in ENV.items():
            # A stale key left in the environment must not stand in for one the secret lacks.
            sources = (revealed,) if secret is not None and fld in CREDENTIALS else (revealed, e)
            value = next((s[n] for s in sources for n in names if (s.get(n) or "").strip()), None)
            if value is not None:
                raw[fld] = value.strip()
        return cls.model_validate(raw)


# The fields a configured secret alone supplies; endpoints, regions and timeouts may still come from env vars.
CREDENTIALS = frozenset(f for f, info in ProviderConfig.model_fields.items() if info.annotation == SecretStr | None)


def build_providers(config: ProviderConfig | None = None) -> dict[str, Provider]:
    """Every provider, configured or not: an unconfigured one reports why in `available()`."""
    c = ProviderConfig.from_env() if config is None else config
    return {
        "anthropic": AnthropicProvider(c.anthropic_api_key, c.anthropic_base_url, timeout_s=c.timeout_s),
        "bedrock": BedrockAnthropicProvider(
            c.bedrock_region, c.aws_access_key_id, c.aws_secret_access_key, session_token=c.aws_session_token,
            bearer_token=c.bedrock_api_key, base_url=c.bedrock_base_url, timeout_s=c.timeout_s),
        "openai": OpenAIProvider(c.openai_api_key, c.openai_base_url, timeout_s=c.timeout_s),
        "azure": AzureOpenAIProvider(c.azure_openai_api_key, c.azure_openai_endpoint,
                                     api_version=c.azure_api_version, timeout_s=c.timeout_s),
        "offline": OfflineProvider(),
    }
