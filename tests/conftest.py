"""Suite-wide rules: as root, no test may be skipped (CI runs as root and must run everything)."""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        if reporter is not None:
            reporter.write_line(
                f"ERROR: {len(skipped)} test(s) skipped while running as root; as root every "
                "test must run (see the skip reasons above)",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
