"""For both suites: with ``CI`` set, a test skipped for a missing prerequisite (see
``integration/prereq.py``) fails instead, so a CI run on a machine without root, containerd,
runc or BTF cannot turn the suite into skips and pass."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from integration.prereq import PREFIX, in_ci


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not (report.skipped and in_ci() and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    if reason.startswith(PREFIX):
        report.outcome = "failed"
        report.longrepr = f"CI is set, so this fails instead of skipping: {reason}"
