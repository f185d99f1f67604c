"""Drives the sensors and runs their requests in-process: `codemind demo` uses the product's own rules."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from codemind_dagster.definitions import build_definitions
from codemind_dagster.instance import get_instance
from codemind_dagster.settings import Settings

SENSORS = ("intent_sensor", "promotion_sensor")
# Events still land in the instance for the UI; the terminal only needs warnings and the driver's progress.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class RunOutcome:
    job: str
    intent: str
    success: bool
    seconds: float
    error: str | None = None


@dataclass
class Driver:
    settings: Settings
    progress: Callable[[str], None] = print
    cursors: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.instance = get_instance(self.settings)
        self.defs = build_definitions(self.settings)

    def tick(self) -> list[RunOutcome]:
        """Evaluate each sensor once and execute what it requests."""
        outcomes = []
        for name in SENSORS:
            sensor = self.defs.resolve_sensor_def(name)
            with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(name),
                                         resources=self.defs.resources, sensor_name=name) as ctx:
                result = sensor(ctx)
            self.cursors[name] = result.cursor
            for req in result.dynamic_partitions_requests or []:
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for rr in result.run_requests or []:
                outcomes.append(self.execute(rr, default_job=sensor.job_name if len(sensor.jobs) == 1 else None))
        return outcomes

    def execute(self, rr: dg.RunRequest, default_job: str | None) -> RunOutcome:
        job_name = rr.job_name or default_job
        env = rr.tags.get("codemind/environment")
        label = f"deploy to {env}" if env else "pipeline (model, plan, code, tests)"
        self.progress(f"{rr.partition_key}: {label} ...")
        started = time.monotonic()
        result = self.defs.resolve_job_def(job_name).execute_in_process(
            instance=self.instance, partition_key=rr.partition_key, tags=rr.tags, run_config=QUIET,
            raise_on_error=False)
        seconds = time.monotonic() - started
        error = None
        if not result.success:
            failures = [e for e in result.all_events if e.is_step_failure]
            error = "; ".join((e.step_failure_data.error.message.strip().splitlines() or ["failed"])[-1]
                              for e in failures) or "run failed"
        self.progress(f"{rr.partition_key}: {label} {'ok' if result.success else 'FAILED'} ({seconds:.1f}s)"
                      + (f": {error}" if error else ""))
        return RunOutcome(job_name, rr.partition_key, result.success, seconds, error)

    def run_until_idle(self, max_ticks: int = 50, on_idle: Callable[[], bool] | None = None) -> list[RunOutcome]:
        """Tick until no sensor requests anything and `on_idle` (e.g. approvals) has nothing to add."""
        done: list[RunOutcome] = []
        for _ in range(max_ticks):
            outcomes = self.tick()
            done.extend(outcomes)
            if not outcomes and not (on_idle and on_idle()):
                break
        return done
