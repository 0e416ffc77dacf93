"""`tproxy lab`, the demo a newcomer runs first, passes and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tproxy.lab.topology import Lab


@pytest.mark.parametrize(("args", "subnet"), [([], "1"), (["--bridge"], "3")])
def test_the_demo_passes_and_cleans_up(lab: Lab, args: list[str], subnet: str) -> None:
    # The `lab` fixture is only used for its root and tools checks; the demo builds its own.
    result = subprocess.run(
        [sys.executable, "-m", "tproxy", "lab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all checks passed" in out
    assert f"it saw you as 198.18.{subnet}.2" in out
    assert f"it saw you as 2001:db8:{subnet}::2" in out
    assert out.count("intact in") == 4
    assert "closed (closed)" in out
    demo_namespaces = set(re.findall(r"\((tp[0-9a-f]{6}-\w+)\)", out))
    assert len(demo_namespaces) == 3
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not demo_namespaces & set(re.findall(r"^(\S+)", left.stdout, re.MULTILINE))
