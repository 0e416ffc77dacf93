"""`tproxy run` fails at start-up with one clear sentence, and starts nothing, on a broken setup."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import WITHOUT_CAPABILITIES, start_proxy
from tproxy.lab.topology import Lab


def _run(lab: Lab, *args: str) -> subprocess.CompletedProcess[bytes]:
    return lab.run(lab.router, [sys.executable, "-m", "tproxy", "run", *args], 20, check=False)


def test_port_in_use(lab: Lab) -> None:
    start_proxy(lab)
    result = _run(lab)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "tproxy: error: cannot listen on 0.0.0.0:1800: the port is already in use by another "
        "program"
    )


def test_address_not_on_this_host(lab: Lab) -> None:
    result = _run(lab, "--listen", "198.19.9.9:1800")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "tproxy: error: cannot listen on 198.19.9.9:1800: the address is not configured on this "
        "host"
    )


def test_not_root(lab: Lab) -> None:
    argv = [sys.executable, "-m", "tproxy", "run", "--listen", "127.0.0.1:1800"]
    result = lab.run(lab.router, [*WITHOUT_CAPABILITIES, *argv], check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "tproxy: error: cannot listen transparently on 127.0.0.1:1800: IP_TRANSPARENT needs root "
        "(CAP_NET_ADMIN)"
    )


def test_sigterm_stops_with_status_0(lab: Lab) -> None:
    proxy = start_proxy(lab)
    assert proxy.stop() == 0
    assert proxy.named("stopped")[0]["signal"] == "SIGTERM"
