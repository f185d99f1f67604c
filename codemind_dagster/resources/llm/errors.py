"""How a provider call failed, in the router's terms: retry, fail over, or stop."""

from __future__ import annotations


class ProviderError(RuntimeError):
    """A provider call failed; `retryable` says whether the router may try it again."""

    retryable = False

    def __init__(self, provider: str, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None):
        self.provider, self.status, self.retry_after_s = provider, status, retry_after_s
        super().__init__(f"{provider}: {message}" + (f" (HTTP {status})" if status else ""))


class TransientError(ProviderError):
    """408/409/429/5xx/529, timeouts and connection errors: retry with backoff, then fail over."""

    retryable = True


class FatalError(ProviderError):
    """400/401/403/404: the same request will fail again anywhere; not retried."""


class SpendLimitError(FatalError):
    """The provider account is out of credit or over its spend limit; not retried."""


class ProviderUnavailable(FatalError):
    """The provider is not configured (no credentials or endpoint)."""


class OutputError(RuntimeError):
    """The model answered, but not with JSON matching the output schema."""

    def __init__(self, message: str, raw: str = ""):
        self.raw = raw
        super().__init__(message)
