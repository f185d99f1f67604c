"""The local profile's Dagster instance, kept under CODEMIND_HOME."""

from __future__ import annotations

import os

from codemind_dagster.settings import Settings

DAGSTER_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 2
"""


def ensure_dagster_home(settings: Settings) -> str:
    """Point DAGSTER_HOME at CODEMIND_HOME/dagster (unless set) and give it a dagster.yaml."""
    home = os.environ.get("DAGSTER_HOME") or str(settings.dagster_home)
    os.makedirs(home, exist_ok=True)
    cfg = os.path.join(home, "dagster.yaml")
    if not os.path.exists(cfg):
        with open(cfg, "w") as f:
            f.write(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = home
    return home


def get_instance(settings: Settings):
    import dagster as dg

    ensure_dagster_home(settings)
    return dg.DagsterInstance.get()
