"""Stopping with the default workers: new connections are refused from the first stop signal,
while the live sessions drain to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.integration.conftest import apply_rules, client_json, start_proxy
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab

MIB = 1024 * 1024


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the default is one worker on this machine")
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("how", ["SIGTERM", "ctrl-c"])
def test_default_workers_refuse_new_connections_at_once_while_draining(
    lab: Lab, family: int, how: str
) -> None:
    """`ctrl-c` is SIGINT to the proxy's whole process group, as a terminal sends it: it must
    start one drain, not count twice in each worker (once from the terminal, once passed on by
    the supervisor) and cut every session at once."""
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))  # --when-down reset, the default
    proxy = start_proxy(lab, default_workers=True)
    peer = str(lab.server.endpoint(PEER_PORT, family))
    argv = [sys.executable, "-m", "tproxy.lab.peers", "upload", peer,
            "--bytes", str(16 * MIB), "--rate", str(8_000_000)]  # about 2 s  # fmt: skip
    upload = lab.start(lab.client, argv, stdout=subprocess.PIPE)
    proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the upload's session")
    if how == "SIGTERM":
        proxy.signal(signal.SIGTERM)
    else:
        proxy.signal_group(signal.SIGINT)
    proxy.wait_for(lambda e: "draining 1 live" in e.get("message", ""), "the drain notice")

    # Every copy of the listening socket is closed: the rules' reset answers the SYN at once,
    # rather than a handshake into a backlog nobody reads (reset only when the drain ends).
    refused = client_json(lab, ["probe", peer, "--timeout", "1"])
    assert refused["connect"] == "ECONNREFUSED", refused
    assert refused["elapsed_s"] < 1, refused
    assert proxy.proc.poll() is None, "the drain ended before the probe: the test proves nothing"

    out, _ = upload.communicate(timeout=60)
    assert json.loads(out)["intact"], out
    assert proxy.proc.wait(10) == 0
    stopped = proxy.named("stopped")
    assert len(stopped) == (os.cpu_count() or 1)
    assert sum(e["sessions_cut"] for e in stopped) == 0
    assert [e["reason"] for e in proxy.named("session_close")] == ["closed"]
