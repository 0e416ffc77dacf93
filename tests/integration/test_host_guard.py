"""The session guard (tests/conftest.py) fails a run that changes its own namespace.

Proved without touching the test machine: an inner pytest session runs in a lab namespace,
where the guard watches that namespace as the "host", with a test that changes it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from tproxy.lab.topology import Lab

REPO = Path(__file__).resolve().parents[2]
CHANGES = {
    "nothing": "pass",
    "nft": "subprocess.run(['nft', 'add', 'table', 'inet', 'left_behind'], check=True)",
    "ip rule": "subprocess.run(['ip', 'rule', 'add', 'fwmark', '9', 'lookup', '99'], check=True)",
    "sysctl": "Path('/proc/sys/net/ipv4/ip_forward').write_text('1')",
    # One test changes it, the next puts it back: the session ends as it started, yet the
    # first test changed the machine.
    "and back": "Path('/proc/sys/net/ipv4/ip_forward').write_text('1')\n\n\n"
    "def test_after() -> None:\n    Path('/proc/sys/net/ipv4/ip_forward').write_text('0')",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_run_that_changes_its_namespace_fails(lab: Lab, change: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-guard-"))
    lab.cleanup_paths.append(workdir)
    (workdir / "test_inner.py").write_text(
        "import subprocess\nfrom pathlib import Path\n\n\n"
        f"def test_it() -> None:\n    {CHANGES[change]}\n"
    )
    lab.sysctl(lab.router, "net.ipv4.ip_forward", "0")
    inner = workdir / "test_inner.py"
    argv = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "pytest", "-p", "tests.conftest",
            "-c", "/dev/null", "--rootdir", str(workdir), "-q", str(inner)]  # fmt: skip
    result = lab.run(lab.router, argv, timeout_s=120, check=False)
    out = result.stdout.decode()
    if change == "nothing":
        assert result.returncode == 0, out
        assert "changed this machine's own network namespace" not in out
    else:
        assert result.returncode == 1, out
        assert "this test changed this machine's own network namespace" in out
        assert "test_inner.py::test_it - " in out  # the error is the test that changed it
        shown = {"nft": "+table inet left_behind", "ip rule": "fwmark 0x9 lookup 99",
                 "sysctl": "+net.ipv4.ip_forward = 1", "and back": "+net.ipv4.ip_forward = 1",
                 }[change]  # fmt: skip
        assert shown in out
        session_wide = "ERROR: the test run changed this machine's own network namespace" in out
        assert session_wide == (change != "and back")
