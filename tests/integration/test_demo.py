"""`tproxy lab`, the demo a newcomer runs first, passes in under a minute, shows what the proxy
read of each session and what its policy decided, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tproxy.lab.topology import Lab


def _close_line(out: str, what: str) -> str:
    """The one session_close line in the demo's output that contains `what`."""
    lines = [line for line in out.splitlines() if " closed (" in line and what in line]
    assert len(lines) == 1, f"{what!r} in {lines}"
    return lines[0]


def _left_running(run_id: str) -> list[str]:
    """Command lines of processes still naming the demo's temp files (nginx -c, s_server
    -cert, tproxy run --policy)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if f"tproxy-lab-{run_id}-" in argv:
            found.append(argv)
    return found


@pytest.mark.parametrize(("args", "subnet"), [([], "1"), (["--bridge"], "3")])
def test_the_demo_passes_and_cleans_up(lab: Lab, args: list[str], subnet: str) -> None:
    # The `lab` fixture is only used for its root and tools checks; the demo builds its own.
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tproxy", "lab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    out = result.stdout
    assert "all checks passed" in out
    assert f"it saw you as 198.18.{subnet}.2" in out
    assert f"it saw you as 2001:db8:{subnet}::2" in out
    assert out.count("intact in") == 4
    assert "closed (closed)" in out

    # The policy it ran with is shown, and the three sessions the policy and the sniffers are
    # about are in its session log: HTTPS with SNI and ALPN, HTTP with its Host, the reset.
    assert 'name = "no-ads"' in out and 'sni_or_host = ["*.ads.example"]' in out
    https = _close_line(out, 'sni="www.example.test"')
    assert "closed (closed)" in https and ":443, " in https
    assert 'tls sni="www.example.test" alpn="h2,http/1.1"' in https
    plain = [line for line in out.splitlines() if 'http "GET" host="www.example.test"' in line]
    assert len(plain) == 2 and all("closed (closed)" in line for line in plain), plain
    reset = _close_line(out, 'sni="www.ads.example"')
    assert "closed (policy_reset)" in reset and 'rule "no-ads": reset' in reset
    assert "reset by rule no-ads, as the policy says" in out
    assert out.count('rule "transfers": allow') == 4
    # Plain HTTP was captured, and tshark follows a capture as the client and server spoke.
    assert out.count('rule "capture-web": allow, captured to "') == 2
    follow = out.split("follow,tcp,ascii,0", 1)[1]
    assert "GET / HTTP/1.1" in follow and "HTTP/1.1 200 OK" in follow
    assert "captured plain HTTP" in out

    # Nothing left behind: namespaces, processes, temp files.
    demo_namespaces = set(re.findall(r"\((tp[0-9a-f]{6}-\w+)\)", out))
    assert len(demo_namespaces) == 3
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not demo_namespaces & set(re.findall(r"^(\S+)", left.stdout, re.MULTILINE))
    run_id = next(iter(demo_namespaces))[2:8]
    assert f"/tproxy-lab-{run_id}-policy-" in out  # the temp files are named by the run id
    assert not list(Path(tempfile.gettempdir()).glob(f"tproxy-lab-{run_id}-*"))
    assert not _left_running(run_id)
