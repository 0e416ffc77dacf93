"""Suite-wide rules, as root (CI runs as root and must run everything):

* no test may be skipped;
* the test machine's own network namespace ends each test, and the session, as it started
  (`tests.host_guard`): every test that changes nftables, routing or sysctls does it in a
  namespace it created.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import host_guard

_HOST_STATE = pytest.StashKey[dict[str, str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        session.config.stash[_HOST_STATE] = host_guard.snapshot()


@pytest.fixture(autouse=True)
def _host_namespace_unchanged() -> Iterator[None]:
    """As root, each test must leave this machine's own namespace as it found it: the session
    check below would miss a test that changed it and a later one that changed it back."""
    if os.geteuid() != 0:
        yield
        return
    before = host_guard.snapshot()
    yield
    changed = host_guard.compare(before, host_guard.snapshot())
    if changed:
        pytest.fail(
            "this test changed this machine's own network namespace (change nftables, routing "
            "and sysctls only in namespaces the test creates):\n" + "\n".join(changed),
            pytrace=False,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def fail(message: str, details: list[str] = []) -> None:  # noqa: B006 (never mutated)
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
            for line in details:
                reporter.write_line(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        fail(
            f"{len(skipped)} test(s) skipped while running as root; as root every test must run "
            "(see the skip reasons above)"
        )
    before = session.config.stash.get(_HOST_STATE, None)
    if before is not None:
        changed = host_guard.compare(before, host_guard.snapshot())
        if changed:
            fail(
                "the test run changed this machine's own network namespace (tests must change "
                "nftables, routing and sysctls only in namespaces they create):",
                changed,
            )
