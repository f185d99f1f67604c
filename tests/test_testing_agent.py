"""The testing agent on real bundles: evidence, coverage, scan, and the sandbox killing bad code."""

from __future__ import annotations

import pytest

from codemind_dagster.agents.contract.suite import render_contract_suite
from codemind_dagster.agents.offline.service_codegen import render_service
from codemind_dagster.agents.testing import run_tests
from codemind_dagster.domain.code import ContractSuite, bundle_hash
from codemind_dagster.domain.intent import read_intent_file
from codemind_dagster.domain.testing import evaluate_checks
from codemind_dagster.resources.sandbox import SubprocessSandbox


@pytest.fixture
def intent(examples):
    return read_intent_file(examples / "inventory-catalog.yaml")


def run(intent, tmp_path, bundle, **limits):
    box = SubprocessSandbox(tmp_path / "sandbox", **limits)
    workdir = box.root / "work"
    workdir.mkdir(parents=True)
    suite = ContractSuite(files=render_contract_suite(intent))
    return run_tests(bundle=bundle, suite=suite, artifact=bundle_hash(bundle), workdir=workdir, sandbox=box)


def test_offline_bundle_passes_every_check(intent, tmp_path):
    report = run(intent, tmp_path, render_service(intent))
    assert report.sandbox_reason is None
    assert report.contract.passed > 20 and report.contract.failed == report.contract.errors == 0
    assert report.own.passed > 0 and report.own.failed == 0
    assert report.coverage_percent >= 80
    assert all(c.passed for c in evaluate_checks(report, 80).values())


def test_a_contract_violation_fails_the_contract_check(intent, tmp_path):
    bundle = render_service(intent)
    app = bundle["service/app.py"]
    assert "status_code=201" in app
    bundle["service/app.py"] = app.replace("status_code=201", "status_code=200")
    report = run(intent, tmp_path, bundle)
    checks = evaluate_checks(report, 80)
    assert report.contract.failed > 0 and not checks["contract_tests_pass"].passed
    assert any("test_create" in f for f in report.failures)


def test_hanging_code_is_killed_at_the_time_limit(intent, tmp_path):
    bundle = render_service(intent)
    bundle["service/app.py"] += "\nimport time\ntime.sleep(10_000)\n"
    report = run(intent, tmp_path, bundle, timeout_s=8, grace_s=0.5)
    assert report.sandbox_reason and "time limit" in report.sandbox_reason
    check = evaluate_checks(report, 80)["contract_tests_pass"]
    assert not check.passed and "time limit" in check.detail


def test_memory_hungry_code_is_stopped_at_the_cap(intent, tmp_path):
    bundle = render_service(intent)
    bundle["service/app.py"] += "\n_hog = bytearray(6 * 1024 ** 3)\n"
    report = run(intent, tmp_path, bundle, memory_mb=1024)
    assert report.sandbox_reason and "memory" in report.sandbox_reason
    assert not evaluate_checks(report, 80)["contract_tests_pass"].passed


def test_a_bundle_cannot_hide_the_contract_suite(intent, tmp_path):
    bundle = render_service(intent)
    bundle["conftest.py"] = ("def pytest_collection_modifyitems(config, items):\n"
                             "    items[:] = [i for i in items if 'contract_tests' not in str(i.path)]\n")
    report = run(intent, tmp_path, bundle)
    assert report.contract.total == 0
    check = evaluate_checks(report, 80)["contract_tests_pass"]
    assert not check.passed and check.detail == "no contract test ran"


def test_high_severity_findings_fail_the_scan_check(intent, tmp_path):
    bundle = render_service(intent)
    bundle["service/unsafe.py"] = "import subprocess\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n"
    report = run(intent, tmp_path, bundle)
    assert report.security_high >= 1 and any("B602" in f for f in report.security_findings)
    assert not evaluate_checks(report, 80)["no_high_severity_findings"].passed


def test_a_pytest_config_above_the_sandbox_changes_nothing(intent, tmp_path):
    # CODEMIND_HOME defaults to ./.codemind inside a project that has its own pytest configuration.
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-x"\ntestpaths = ["nope"]\n')
    report = run(intent, tmp_path, render_service(intent))
    assert report.contract.passed > 20 and report.own.passed > 0
    assert evaluate_checks(report, 80)["contract_tests_pass"].passed
