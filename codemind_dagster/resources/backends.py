"""Which graph, artifact, secret and cloud-cost backend is active (probes.py says whether each answers)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel

from codemind_dagster.settings import Settings


class Backends(BaseModel):
    """The production stores configured by Settings; None/False means the embedded default."""

    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_secret_id: str | None = None
    aws_cost: bool = False
    neo4j_url: str | None = None
    neo4j_user: str = "neo4j"

    @classmethod
    def from_settings(cls, s: Settings) -> Backends:
        return cls(**{k: getattr(s, k) for k in cls.model_fields})

    def __repr_args__(self):
        # A URL may carry a user and password: repr() shows it as the status tables do.
        for k, v in super().__repr_args__():
            yield k, display_url(v) if k in ("s3_endpoint_url", "neo4j_url") and v else v

    def active(self) -> list[dict[str, str]]:
        """One row per role: the backend in force and where it points (never a credential)."""
        s3 = f"s3://{self.s3_bucket}" + (f" at {display_url(self.s3_endpoint_url)}" if self.s3_endpoint_url else "")
        return [
            {"role": "graph_store", "backend": "neo4j" if self.neo4j_url else "sql",
             "target": f"{display_url(self.neo4j_url)} (user {self.neo4j_user})" if self.neo4j_url
             else "platform database"},
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
