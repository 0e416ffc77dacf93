"""`tproxy run --workers N`: sessions spread over workers, a dead one comes back, stop is clean."""

from __future__ import annotations

import os
import signal

from tests.integration.conftest import apply_rules, client_json, start_proxy
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab, wait_until


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_two_workers_serve_restart_and_stop(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    peer = str(lab.server.endpoint(PEER_PORT))
    result = client_json(lab, ["swarm", peer, "--count", "400"])
    assert result["outcomes"] == {"intact": 400}, result
    opened = proxy.named("session_open")
    assert {e["worker"] for e in opened} == {1, 2}, "one worker did all the work"

    # Kill one worker outright: the supervisor starts a new one and service goes on.
    workers = _children(proxy.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    proxy.wait_for(lambda e: "restarting it" in e.get("message", ""), "the restart notice")
    wait_until(lambda: len(proxy.named("listening")) == 3, 10, "the new worker to listen")
    assert len(_children(proxy.proc.pid)) == 2
    again = client_json(lab, ["swarm", peer, "--count", "100"])
    assert again["outcomes"] == {"intact": 100}, again

    # SIGHUP reaches every worker (without --config each says there is nothing to reload).
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "nothing to reload" in e.get("message", ""), "both", count=2)

    assert proxy.stop() == 0
    assert len(proxy.named("stopped")) == 2  # each worker drained and said so
