"""Test reports and the rules of the blocking checks on them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SuiteResult(BaseModel):
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors


class TestReport(BaseModel):
    """What the testing agent measured for one artifact."""

    __test__ = False  # not a pytest class

    artifact: str
    contract: SuiteResult
    own: SuiteResult
    coverage_percent: float
    security_high: int
    security_medium: int
    security_findings: list[str] = Field(default_factory=list)
    failures: list[str] = Field(default_factory=list)
    sandbox_reason: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> int:
        return self.contract.passed + self.own.passed

    @property
    def failed(self) -> int:
        return self.contract.failed + self.contract.errors + self.own.failed + self.own.errors


class CheckOutcome(BaseModel):
    passed: bool
    detail: str


CHECK_NAMES = ("contract_tests_pass", "coverage_threshold", "no_high_severity_findings")


def evaluate_checks(report: TestReport, coverage_threshold: float) -> dict[str, CheckOutcome]:
    """The blocking checks of test_results; asset checks and status read the same rules."""
    c = report.contract
    contract_ok = c.total > 0 and c.failed == 0 and c.errors == 0 and report.sandbox_reason is None
    contract_detail = f"{c.passed} passed, {c.failed + c.errors} failed, {c.skipped} skipped"
    if report.sandbox_reason:
        contract_detail += f"; sandbox: {report.sandbox_reason}"
    elif c.total == 0:
        contract_detail = "no contract test ran"
    return {
        "contract_tests_pass": CheckOutcome(passed=contract_ok, detail=contract_detail),
        "coverage_threshold": CheckOutcome(
            passed=report.coverage_percent >= coverage_threshold,
            detail=f"{report.coverage_percent:.1f}% (threshold {coverage_threshold:.0f}%)"),
        "no_high_severity_findings": CheckOutcome(
            passed=report.security_high == 0,
            detail=f"{report.security_high} high, {report.security_medium} medium"
            + (f": {'; '.join(report.security_findings[:3])}" if report.security_findings else "")),
    }
