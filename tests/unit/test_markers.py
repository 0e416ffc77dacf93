"""The `root` marker selects exactly the integration tests (what `-m "not root"` relies on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _collected(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_every_integration_test_is_marked_root_and_no_unit_test_is() -> None:
    integration = _collected("tests/integration")
    assert len(integration) > 50
    assert _collected("-m", "root", "tests/integration") == integration
    assert _collected("-m", "not root", "tests/integration") == []
    assert _collected("-m", "root", "tests/unit") == []
