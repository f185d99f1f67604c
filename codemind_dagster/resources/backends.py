"""Which graph, artifact, secret and cloud-cost backend is active, and whether each answers."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from codemind_dagster.settings import Settings

# Every Cost Explorer request is billed (USD 0.01 on AWS), so a health probe never calls it.
COST_EXPLORER_NOT_PROBED = "enabled; not probed (each Cost Explorer request is billed)"


class Backends(BaseModel):
    """The production stores configured by Settings; None/False means the embedded default."""

    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_secret_id: str | None = None
    aws_cost: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> Backends:
        return cls(s3_bucket=s.s3_bucket, s3_endpoint_url=s.s3_endpoint_url, aws_region=s.aws_region, aws_secret_id=s.aws_secret_id,
                   aws_cost=s.aws_cost)

    def __repr_args__(self):
        # A URL may carry a user and password: repr() shows it as the status tables do.
        for k, v in super().__repr_args__():
            yield k, display_url(v) if k == "s3_endpoint_url" and v else v

    def active(self) -> list[dict[str, str]]:
        """One row per role: the backend in force and where it points (never a credential)."""
        s3 = f"s3://{self.s3_bucket}" + (f" at {display_url(self.s3_endpoint_url)}" if self.s3_endpoint_url else "")
        return [
            {"role": "graph_store", "backend": "sql", "target": "platform database"},
            {"role": "artifacts", "backend": "s3" if self.s3_bucket else "filesystem",
             "target": s3 if self.s3_bucket else "$CODEMIND_HOME/artifacts"},
            {"role": "secrets", "backend": "aws-secrets-manager" if self.aws_secret_id else "environment",
             "target": f"{self.aws_secret_id} ({self.aws_region})" if self.aws_secret_id else "env vars"},
            {"role": "cloud_cost", "backend": "aws-cost-explorer" if self.aws_cost else "none",
             "target": self.aws_region if self.aws_cost else "LLM ledger only"},
        ]


def display_url(url: str | None) -> str:
    """A URL without its user and password, safe for metadata and logs."""
    if not url:
        return "-"
    try:
        p = urlsplit(url)
        port = f":{p.port}" if p.port else ""
        return f"{p.scheme}://{p.hostname or '?'}{port}{p.path}"
    except ValueError:
        return "<unparseable url>"


def _result(name: str, healthy: bool, started: float, detail: str) -> dict[str, Any]:
    return {"name": name, "healthy": healthy, "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "detail": detail}


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _aws_client(service: str, b: Backends, timeout_s: float, endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1})
    return boto3.client(service, region_name=b.aws_region, endpoint_url=endpoint_url, config=config)


def probe_s3(b: Backends, timeout_s: float) -> dict[str, Any]:
    """HEAD of the artifact bucket."""
    started = time.perf_counter()
    try:
        _aws_client("s3", b, timeout_s, b.s3_endpoint_url).head_bucket(Bucket=b.s3_bucket)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        return _result("artifacts", False, started, f"s3://{b.s3_bucket}: {_error(exc)}")
    return _result("artifacts", True, started, f"s3://{b.s3_bucket}: bucket answers")


def probe_secret(b: Backends, timeout_s: float) -> dict[str, Any]:
    """DescribeSecret: proves the secret exists and is readable by name without fetching its value."""
    started = time.perf_counter()
    try:
        meta = _aws_client("secretsmanager", b, timeout_s).describe_secret(SecretId=b.aws_secret_id)
    except Exception as exc:  # noqa: BLE001
        return _result("secrets", False, started, f"secret {b.aws_secret_id}: {_error(exc)}")
    changed = meta.get("LastChangedDate")
    return _result("secrets", True, started, f"secret {b.aws_secret_id}: exists"
                   + (f", changed {changed:%Y-%m-%d}" if changed else ""))


def probe_backends(b: Backends, timeout_s: float) -> list[dict[str, Any]]:
    """Probes of the configured production stores."""
    probes = []
    if b.s3_bucket:
        probes.append(probe_s3(b, timeout_s))
    if b.aws_secret_id:
        probes.append(probe_secret(b, timeout_s))
    if b.aws_cost:
        probes.append({"name": "cloud_cost", "healthy": True, "probed": False, "latency_ms": 0.0,
                       "detail": f"aws cost explorer ({b.aws_region}): {COST_EXPLORER_NOT_PROBED}"})
    return probes
