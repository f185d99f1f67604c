"""Drives the sensors and runs their requests in-process: `codemind demo` uses the product's own rules."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from codemind_dagster.definitions import build_definitions
from codemind_dagster.instance import get_instance
from codemind_dagster.settings import Settings

SENSORS = ("intent_sensor", "promotion_sensor")
# Events still land in the instance for the UI; the terminal only needs warnings and the driver's progress.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
LAUNCH_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 1800.0


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
        self._published = False
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
                # The UI shows a run as launched by a sensor only when it carries the sensor's name tag.
                rr = rr.with_replaced_attrs(tags={**rr.tags, "dagster/sensor_name": name})
                outcomes.append(self.execute(rr, default_job=sensor.job_name if len(sensor.jobs) == 1 else None))
        return outcomes

    def execute(self, rr: dg.RunRequest, default_job: str | None) -> RunOutcome:
        job_name = rr.job_name or default_job
        env = rr.tags.get("codemind/environment")
        label = f"deploy to {env}" if env else "pipeline (model, plan, code, tests)"
        self.progress(f"{rr.partition_key}: {label} ...")
        started = time.monotonic()
        if self.settings.profile == "k8s":
            success, error = self.launch(job_name, rr)
        else:
            result = self.defs.resolve_job_def(job_name).execute_in_process(
                instance=self.instance, partition_key=rr.partition_key, tags=rr.tags, run_config=QUIET,
                raise_on_error=False)
            success, error = result.success, None
            if not success:
                error = _failure_text(e.step_failure_data for e in result.all_events if e.is_step_failure)
        seconds = time.monotonic() - started
        self.progress(f"{rr.partition_key}: {label} {'ok' if success else 'FAILED'} ({seconds:.1f}s)"
                      + (f": {error}" if error else ""))
        return RunOutcome(job_name, rr.partition_key, success, seconds, error)

    def launch(self, job_name: str, rr: dg.RunRequest, run_id: str | None = None) -> tuple[bool, str | None]:
        """Launch through the instance's K8sRunLauncher (`dagster job launch`) and wait for the run's end."""
        from codemind_dagster.instance import publish_instance_config

        if not self._published:
            publish_instance_config(self.settings)
            self._published = True
        run_id = run_id or str(uuid.uuid4())
        tags = {**rr.tags, "dagster/partition": rr.partition_key} if rr.partition_key else dict(rr.tags)
        cmd = [str(Path(sys.executable).parent / "dagster"), "job", "launch", "-m", "codemind_dagster.definitions",
               "-j", job_name, "--run-id", run_id, "--tags", json.dumps(tags), "--config-json", json.dumps(QUIET)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return False, f"`dagster job launch` did not return within {LAUNCH_TIMEOUT_S:.0f} s"
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            return False, f"`dagster job launch` failed: {' | '.join(said)}"
        self.progress(f"{rr.partition_key or job_name}: run {run_id[:8]} is a Kubernetes Job (dagster-run-{run_id})")
        return self._wait(run_id)

    def _wait(self, run_id: str) -> tuple[bool, str | None]:
        deadline, next_look = time.monotonic() + RUN_TIMEOUT_S, time.monotonic() + 3
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished and time.monotonic() >= next_look:
                next_look = time.monotonic() + 3
                stuck = _stuck_pod(self.settings, run_id)
                if stuck:
                    # A pod that cannot start never reports to the instance: end the run here, with the reason.
                    self.instance.run_launcher.terminate(run_id)
                    self.instance.report_run_failed(run, f"run worker pod cannot start: {stuck}")
                    return False, f"run worker pod cannot start: {stuck}"
            if run is not None and run.is_finished:
                if run.is_success:
                    return True, None
                failures = [e.dagster_event.step_failure_data for e in self.instance.all_logs(
                    run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]
                if failures:
                    return False, _failure_text(failures)
                engine = [e.user_message for e in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)]
                return False, (engine[-1] if engine else f"run {run.status.value}")
            time.sleep(1.0)
        return False, f"run {run_id} did not finish within {RUN_TIMEOUT_S:.0f} s; see it in the Dagster UI"

    def run_until_idle(self, max_ticks: int = 50, on_idle: Callable[[], bool] | None = None) -> list[RunOutcome]:
        """Tick until no sensor requests anything and `on_idle` (e.g. approvals) has nothing to add."""
        done: list[RunOutcome] = []
        for _ in range(max_ticks):
            outcomes = self.tick()
            done.extend(outcomes)
            if not outcomes and not (on_idle and on_idle()):
                break
        return done


def _failure_text(failures) -> str:
    msgs = [(f.error.message.strip().splitlines() or ["failed"])[-1] if f.error else "failed" for f in failures]
    return "; ".join(msgs) or "run failed"


_FATAL_WAITING = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                  "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def _stuck_pod(settings: Settings, run_id: str) -> str | None:
    """The reason a run's worker pod waits for good (a bad image or command), or None."""
    from kubernetes import client, config

    from codemind_dagster.instance import RUN_NAMESPACE

    core = client.CoreV1Api(config.new_client_from_config(str(settings.kubeconfig_path)))
    for pod in core.list_namespaced_pod(RUN_NAMESPACE, label_selector=f"dagster/run-id={run_id}").items:
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in _FATAL_WAITING:
                return f"{pod.metadata.name}: {waiting.reason}: {waiting.message}"
    return None
