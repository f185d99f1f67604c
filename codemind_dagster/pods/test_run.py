"""In the sandbox pod: run the testing agent on the mounted bundle and report the result through Dagster Pipes."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

# Mounted from the run's ConfigMap; written by KubeSandbox.
INPUT = Path(os.environ.get("CODEMIND_TEST_INPUT", "/codemind/input/run.json"))
EVIDENCE = ("junit.xml", "coverage.json", "bandit.json")
REPORT_MESSAGE = "codemind.test_report"


def main() -> int:
    from dagster_pipes import open_dagster_pipes

    from codemind_dagster.agents.testing import run_tests
    from codemind_dagster.domain.code import ContractSuite
    from codemind_dagster.resources.sandbox import SubprocessSandbox

    with open_dagster_pipes() as pipes:
        spec = json.loads(INPUT.read_text())
        scratch = Path(os.environ.get("CODEMIND_SCRATCH", "/codemind/scratch")).resolve()
        workdir = scratch / "run"
        workdir.mkdir(parents=True, exist_ok=True)
        box = SubprocessSandbox(scratch, timeout_s=spec["timeout_s"], memory_mb=spec["memory_mb"])
        pipes.log.info(f"testing {spec['artifact'][:12]}: {len(spec['bundle'])} code files, "
                       f"{len(spec['suite'])} contract files, in pod {os.environ.get('HOSTNAME', '?')}")
        report = run_tests(bundle=spec["bundle"], suite=ContractSuite(files=spec["suite"]),
                           artifact=spec["artifact"], workdir=workdir, sandbox=box)
        evidence = {n: base64.b64encode((workdir / n).read_bytes()).decode() for n in EVIDENCE
                    if (workdir / n).is_file()}
        pipes.report_custom_message({"kind": REPORT_MESSAGE, "report": report.model_dump(mode="json"),
                                     "evidence": evidence})
        pipes.log.info(f"{report.passed} passed, {report.failed} failed, coverage {report.coverage_percent}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
