"""pytest plugin: with ``HF_RESIDUAL_FAIL_ON_SKIP=1`` (set by ``.ci/run``) every skip is a failure.

A test that skips because a tool or package is missing (chromium, actionlint, an extra) would otherwise turn
a broken install into a green run. Locally, without the variable, skips stay skips and say what to install.
"""

from __future__ import annotations

import os

import pytest


def _fail_on_skip() -> bool:
    return os.environ.get("HF_RESIDUAL_FAIL_ON_SKIP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _fail_on_skip() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where nothing may skip (HF_RESIDUAL_FAIL_ON_SKIP=1): {reason}"


def pytest_sessionfinish(session, exitstatus):
    """Skips outside a test (a module skipped at collection) fail the run too."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _fail_on_skip() and reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
