"""Where each environment lives in the k8s profile: a kubeconfig context and a namespace, and API clients."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# Labels and annotations every object the platform applies carries; state and drift read them back.
MANAGED_BY = {"app.kubernetes.io/managed-by": "codemind"}
SERVICE_LABEL = "app.kubernetes.io/name"
ENV_LABEL = "codemind.dev/environment"
ARTIFACT_ANNOTATION = "codemind.dev/artifact"

DEFAULT_CONTEXTS = {"dev": "dev-staging", "staging": "dev-staging", "production": "production", "dr": "dr"}
DEFAULT_NAMESPACES = {"dev": "codemind-dev", "staging": "codemind-staging", "production": "codemind-production",
                      "dr": "codemind-production"}


@dataclass(frozen=True)
class Target:
    """One environment's place in a cluster."""

    environment: str
    context: str
    namespace: str


@dataclass(frozen=True)
class ClusterMap:
    """Every environment's target, from one kubeconfig."""

    kubeconfig: Path
    contexts: dict[str, str]
    namespaces: dict[str, str]

    @classmethod
    def parse(cls, kubeconfig: Path, contexts_json: str | None = None,
              namespaces_json: str | None = None) -> ClusterMap:
        """Defaults overridden by CODEMIND_K8S_CONTEXTS / CODEMIND_K8S_NAMESPACES (JSON objects env -> name)."""
        return cls(kubeconfig=kubeconfig,
                   contexts=DEFAULT_CONTEXTS | _json_map("CODEMIND_K8S_CONTEXTS", contexts_json),
                   namespaces=DEFAULT_NAMESPACES | _json_map("CODEMIND_K8S_NAMESPACES", namespaces_json))

    def target(self, environment: str) -> Target:
        if environment not in self.contexts:
            raise KeyError(f"no kubeconfig context for environment {environment!r} "
                           f"(known: {', '.join(sorted(self.contexts))})")
        return Target(environment, self.contexts[environment], self.namespaces[environment])

    def api_client(self, context: str) -> Any:
        """A kubernetes ApiClient for one context of the kubeconfig, cached per (file, context)."""
        if not self.kubeconfig.is_file():
            raise FileNotFoundError(f"kubeconfig {self.kubeconfig} not found: start the clusters with "
                                    "`make k8s-up` or set CODEMIND_KUBECONFIG")
        return _client(str(self.kubeconfig), context, self.kubeconfig.stat().st_mtime_ns)


@cache
def _client(kubeconfig: str, context: str, _mtime: int) -> Any:
    from kubernetes import config

    return config.new_client_from_config(kubeconfig, context=context)


def _json_map(name: str, raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: expected a JSON object of environment -> name, got {raw!r} ({e})") from e
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{name}: expected a JSON object of environment -> name, got {raw!r}")
    return value
