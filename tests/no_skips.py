"""A pytest plugin: a run in which any test was skipped fails.

Tests find their data in the repository (tests/data), so a skip means something is missing that should
not be: a run with skips must not pass unnoticed. Tests that need hardware CI lacks carry a marker
(`gpu`) that the README's test command deselects; deselected tests are not skips.
"""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_line(
            f"FAILED: {len(skipped)} test(s) skipped; grokserve's suite runs with 0 skipped "
            "(see tests/no_skips.py)", red=True, bold=True)
