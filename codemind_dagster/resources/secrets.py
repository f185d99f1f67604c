"""One JSON secret in AWS Secrets Manager (provider keys, the database URL), held as SecretStr."""

from __future__ import annotations

import json
import logging
import threading
import warnings
from contextlib import contextmanager

import dagster as dg
from pydantic import SecretStr

DATABASE_URL_KEY = "CODEMIND_DATABASE_URL"
# Few attempts: a wrong endpoint or a denied role is a configuration error, not a blip worth a minute of retries.
MAX_ATTEMPTS = 2
DENIED = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
          "ExpiredTokenException", "KMSAccessDeniedException"}


_READING = threading.local()


class _HideResponseBodies(logging.Filter):
    """Drops botocore's DEBUG dump of response bodies (it prints SecretString) while this thread reads a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_READING, "secret", False)


_FILTER = _HideResponseBodies()


@contextmanager
def _bodies_unlogged():
    logger = logging.getLogger("botocore.parsers")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    _READING.secret = True
    try:
        yield
    finally:
        _READING.secret = False


class SecretError(RuntimeError):
    """A secret could not be resolved; messages name the secret and the endpoint, never a value."""


class SecretNotFound(SecretError):
    """The secret does not exist (or has no current value)."""


class SecretNotJson(SecretError):
    """The secret is not a JSON object of strings."""


class SecretUnreachable(SecretError):
    """Access was denied, or the endpoint did not answer."""


def fetch_secret(secret_id: str, *, region_name: str | None = None,
                 endpoint_url: str | None = None) -> dict[str, SecretStr]:
    """The secret's keys and values, resolved through dagster-aws's SecretsManagerResource."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from dagster_aws.secretsmanager import SecretsManagerResource

    if not secret_id or not secret_id.strip():
        raise ValueError("no secret id given: set CODEMIND_AWS_SECRET_ID to the secret's name or ARN")
    with warnings.catch_warnings():
        # Beta in dagster-aws: the warning would repeat at every resource setup without telling anyone anything.
        warnings.simplefilter("ignore", dg.BetaWarning)
        client = SecretsManagerResource(region_name=region_name, endpoint_url=endpoint_url,
                                        max_attempts=MAX_ATTEMPTS).get_client()
    where = f"secret {secret_id!r} at {client.meta.endpoint_url}"
    try:
        with _bodies_unlogged():
            answer = client.get_secret_value(SecretId=secret_id)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "ResourceNotFoundException":
            raise SecretNotFound(f"{where} does not exist (or has no current version)") from None
        detail = code if code and not code.isdigit() else f"HTTP {status}"
        if status == 403 or code in DENIED:
            raise SecretUnreachable(f"{where}: access denied ({detail}); check the role's "
                                    "secretsmanager:GetSecretValue (and kms:Decrypt) permissions") from None
        raise SecretError(f"{where}: Secrets Manager answered {detail}") from None
    except NoCredentialsError:
        raise SecretUnreachable(f"{where}: no AWS credentials found to read it with") from None
    except BotoCoreError as e:
        raise SecretUnreachable(f"{where} is unreachable ({type(e).__name__})") from None
    return parse_secret(answer.get("SecretString"), where)


def parse_secret(text: str | None, where: str) -> dict[str, SecretStr]:
    """A JSON object of string values; errors never quote the text, which is the secret."""
    if text is None:
        raise SecretNotJson(f"{where} holds binary data: expected a JSON object of strings")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SecretNotJson(f"{where} is not JSON (line {e.lineno} column {e.colno}): "
                            'expected {"ANTHROPIC_API_KEY": "...", ...}') from None
    if not isinstance(raw, dict):
        raise SecretNotJson(f"{where} is JSON but not an object of keys: found a {type(raw).__name__}")
    wrong = sorted(k for k, v in raw.items() if not isinstance(v, str))
    if wrong:
        raise SecretNotJson(f"{where}: the values of {', '.join(wrong)} are not strings")
    return {k: SecretStr(v) for k, v in raw.items()}


def database_url_from_secret(secret_id: str, *, region_name: str | None = None,
                             endpoint_url: str | None = None) -> SecretStr:
    """CODEMIND_DATABASE_URL from the secret; a secret without it is a clear error."""
    values = fetch_secret(secret_id, region_name=region_name, endpoint_url=endpoint_url)
    url = values.get(DATABASE_URL_KEY)
    if url is None or not url.get_secret_value().strip():
        raise SecretError(f"secret {secret_id!r} has no {DATABASE_URL_KEY} (keys: {', '.join(sorted(values))})")
    return url
